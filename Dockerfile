# syntax=docker/dockerfile:1
# The extproc image: `docker build -t extproc:0.1.0 .` (the default target, "sidecar").
# `--target demo` adds the quick-start tokenizer file for the model alias "demo" (used by
# docker-compose.yml); production images map real tokenizer files with EXTPROC_TOKENIZERS.

ARG PYTHON_IMAGE=python:3.11-slim

# Build: a virtualenv with the package and its runtime dependencies only (no extras).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/extproc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN /opt/extproc/bin/pip install .

# Runtime: the virtualenv on a clean base, run as an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid extproc --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc /opt/extproc
USER 10001:10001
# 50051: ext_proc gRPC (EXTPROC_LISTEN); 9464: Prometheus metrics (EXTPROC_METRICS_LISTEN).
EXPOSE 50051 9464
# `extproc serve` drains in-flight streams and pending commits on SIGTERM.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["extproc", "health"]
ENTRYPOINT ["extproc"]
CMD ["serve"]

# The quick-start tokenizer: exported from a tokenizer shipped inside a PyPI package, in a
# throw-away stage, so that package never reaches an image.
FROM build AS demo-tokenizer
RUN /opt/extproc/bin/pip install "mistral-common>=1.5" \
 && /opt/extproc/bin/extproc tokenizer export --from tekken /out/demo-tokenizer.json

# The demo image also runs the demo upstream (`extproc demo-upstream`): the demo extra.
FROM build AS demo-venv
RUN /opt/extproc/bin/pip install ".[demo]"

FROM runtime AS demo
COPY --from=demo-venv /opt/extproc /opt/extproc
COPY --from=demo-tokenizer /out/demo-tokenizer.json /opt/extproc-demo/tokenizer.json

# The default target: the plain runtime image.
FROM runtime AS sidecar
