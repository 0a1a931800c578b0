"""The Tokenizer port over Hugging Face ``tokenizers``: local tokenizer.json files, per alias.

Rules:
* a file is loaded once, lazily (or all at once by ``validate`` at start), and its version is
  a digest of its bytes, so replacing the file re-keys the cache after a restart;
* counting uses the encoder's fastest path (``encode_batch_fast``: no offsets, and only the
  length of each encoding is read), whose counts equal ``encode_batch``'s; a file whose
  normalizer is a Unicode normal form (NFC, NFD, NFKC, NFKD) also gets an ASCII twin, the same
  encoder (model shared, not copied) without that normalizer, used for batches that are all
  ASCII, which every normal form leaves as they are;
* encoding runs in a small thread pool (``tokenizers`` releases the GIL), never on the event
  loop, behind a bounded queue: a count that finds ``queue_limit`` counts already waiting for a
  thread fails at once with ``DependencyError`` (the request degrades to zero-active) instead
  of waiting its deadline out; a count whose caller gives up while it waits is dropped unrun.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer as HfTokenizer
from tokenizers import normalizers

from extproc.adapters.breaker import Breaker
from extproc.adapters.tokenizers_remote import RemoteTimeouts, RemoteTokenizer
from extproc.core.errors import DependencyError, UnmappedModel
from extproc.core.model import TokenCounts

_T = TypeVar("_T")


class TokenizerFileError(DependencyError):
    """A tokenizer file is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class LoadedTokenizer:
    """A tokenizer loaded from a file, with the version that file's bytes give it.

    ``ascii_encoder``, when set, counts exactly like ``encoder`` on ASCII text, faster.
    """

    version: str
    encoder: HfTokenizer
    ascii_encoder: HfTokenizer | None = None

    def count(self, segments: list[str]) -> tuple[int, ...]:
        """Tokens in each segment (see ``count_tokens``)."""
        twin = self.ascii_encoder
        if twin is not None and all(map(str.isascii, segments)):
            return count_tokens(twin, segments)
        return count_tokens(self.encoder, segments)


def file_version(data: bytes) -> str:
    """The tokenizer version of a file's bytes: a short SHA-256 digest."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def load_tokenizer_file(path: Path) -> LoadedTokenizer:
    """Load one tokenizer.json; padding and truncation are switched off so counts are exact."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerFileError(f"tokenizer file {path}: {exc.strerror or exc}") from exc
    try:
        encoder = HfTokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        raise TokenizerFileError(f"tokenizer file {path}: not a tokenizer.json") from exc
    encoder.no_padding()
    encoder.no_truncation()
    return LoadedTokenizer(file_version(data), encoder, ascii_twin(encoder))


_ASCII_INVARIANT = (normalizers.NFC, normalizers.NFD, normalizers.NFKC, normalizers.NFKD)


def ascii_twin(encoder: HfTokenizer) -> HfTokenizer | None:
    """``encoder`` without its normalizer, if that is a normal form (which keeps ASCII as is)."""
    if not isinstance(encoder.normalizer, _ASCII_INVARIANT):
        return None
    twin = HfTokenizer(encoder.model)  # the same model object: nothing large is copied
    twin.pre_tokenizer = encoder.pre_tokenizer
    twin.post_processor = encoder.post_processor
    twin.decoder = encoder.decoder
    twin.encode_special_tokens = encoder.encode_special_tokens
    added = [token for _id, token in sorted(encoder.get_added_tokens_decoder().items())]
    twin.add_special_tokens([token for token in added if token.special])
    twin.add_tokens([token for token in added if not token.special])
    return twin


def count_tokens(encoder: HfTokenizer, segments: list[str]) -> tuple[int, ...]:
    """Tokens in each segment, without special tokens (so counts add up across segments)."""
    try:
        encodings = encoder.encode_batch_fast(segments, add_special_tokens=False)
    except Exception as exc:  # e.g. a lone surrogate cannot cross into the Rust side
        raise DependencyError(f"tokenizer cannot encode the segments: {exc}") from exc
    return tuple(map(len, encodings))


DEFAULT_QUEUE_LIMIT = 64


class EmbeddedTokenizer:
    """Counts with tokenizer files on local disk, one per model alias."""

    def __init__(
        self,
        files: Mapping[str, str | Path],
        workers: int = 2,
        load: Callable[[Path], LoadedTokenizer] = load_tokenizer_file,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self._files = {alias: Path(path) for alias, path in files.items()}
        self._load = load
        self._loaded: dict[Path, LoadedTokenizer] = {}
        self._loading: dict[Path, asyncio.Future[LoadedTokenizer]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "extproc-tokenize")
        self._limit = workers + queue_limit
        self._in_flight = 0
        self.rejected = 0

    def maps(self, alias: str) -> bool:
        return alias in self._files

    def validate(self) -> None:
        """Load every mapped file now; raises one ``TokenizerFileError`` naming every bad file."""
        problems = []
        for path in sorted(set(self._files.values())):
            try:
                self._loaded[path] = self._loaded.get(path) or self._load(path)
            except TokenizerFileError as exc:
                problems.append(str(exc))
        if problems:
            raise TokenizerFileError("; ".join(problems))

    async def version(self, alias: str) -> str | None:
        if alias not in self._files:
            return None
        return (await self._get(self._files[alias])).version

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        if alias not in self._files:
            raise UnmappedModel(f"no tokenizer is mapped for model {alias!r}")
        loaded = await self._get(self._files[alias])
        counts: tuple[int, ...] = ()
        if segments:
            counts = await self._queued(loaded.count, list(segments))
        return TokenCounts(loaded.version, counts)

    async def _queued(self, work: Callable[..., _T], *args: Any) -> _T:
        """``work(*args)`` in the pool, unless ``queue_limit`` counts wait for it already."""
        if self._in_flight >= self._limit:
            self.rejected += 1
            raise DependencyError("tokenizer queue is full")
        future = self._submit(work, *args)
        self._in_flight += 1
        future.add_done_callback(self._left)
        return await future

    def _left(self, _done: asyncio.Future[Any]) -> None:
        self._in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        self.close()

    async def _get(self, path: Path) -> LoadedTokenizer:
        """The loaded file; concurrent first callers share one load, a failed load is retried."""
        loaded = self._loaded.get(path)
        if loaded is not None:
            return loaded
        pending = self._loading.get(path)
        if pending is None:
            pending = self._submit(self._load, path)
            pending.add_done_callback(functools.partial(self._forget, path))
            self._loading[path] = pending
        loaded = await asyncio.shield(pending)
        self._loaded[path] = loaded
        return loaded

    def _submit(self, work: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        try:
            return asyncio.get_running_loop().run_in_executor(self._pool, work, *args)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            raise DependencyError("tokenizer is closed") from exc

    def _forget(self, path: Path, done: asyncio.Future[LoadedTokenizer]) -> None:
        if self._loading.get(path) is done:
            del self._loading[path]
        if not done.cancelled():
            done.exception()  # retrieved here: a caller may have been cancelled meanwhile


class CompositeTokenizer:
    """Embedded files for the aliases they map; the tokenizer service, if any, for the rest."""

    def __init__(self, embedded: EmbeddedTokenizer, remote: RemoteTokenizer | None) -> None:
        self.embedded = embedded
        self.remote = remote

    def validate(self) -> None:
        self.embedded.validate()

    async def version(self, alias: str) -> str | None:
        if self.embedded.maps(alias) or self.remote is None:
            return await self.embedded.version(alias)
        return await self.remote.version(alias)

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        if self.embedded.maps(alias) or self.remote is None:
            return await self.embedded.count(alias, segments)
        return await self.remote.count(alias, segments)

    async def aclose(self) -> None:
        await self.embedded.aclose()
        if self.remote is not None:
            await self.remote.aclose()


def build_tokenizer(
    url: str | None,
    files: Mapping[str, str | Path],
    timeouts: RemoteTimeouts | None = None,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    breaker: Breaker | None = None,
) -> CompositeTokenizer:
    """The tokenizer the server uses: ``files`` embedded, the service at ``url`` for the rest."""
    remote = RemoteTokenizer(url, timeouts or RemoteTimeouts(), breaker=breaker) if url else None
    return CompositeTokenizer(EmbeddedTokenizer(files, queue_limit=queue_limit), remote)
