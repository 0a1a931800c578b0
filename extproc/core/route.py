"""Who sent a request and what its line says: the caller, the request facts, the media types.

Rules:
* which requests are ours is the dialects' (``dialects.for_request``);
* the caller's token is the value after ``Bearer `` or ``bearer `` (value and token trimmed)
  of ``authorization``, else the ``x-api-key`` header (trimmed), the one Anthropic's SDKs send;
* the caller keeps only the headers the principal source reads, never the others;
* when Envoy skips the request headers, the same facts come from the request attributes
  ``request.path``, ``request.method``, ``request.id`` and ``request.headers['<name>']``
  (an absent header is an absent attribute).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.core.model import Caller

SSE_TYPE = "text/event-stream"
PATH_ATTRIBUTE = "request.path"
METHOD_ATTRIBUTE = "request.method"
ID_ATTRIBUTE = "request.id"
REQUEST_ID_HEADER = "x-request-id"
API_KEY_HEADER = "x-api-key"
TOKEN_HEADERS = frozenset({"authorization", API_KEY_HEADER})
MAX_REQUEST_ID = 128


def header_attribute(name: str) -> str:
    """The request attribute that carries header ``name`` (lower case)."""
    return f"request.headers['{name}']"


@dataclass(frozen=True, slots=True)
class RequestLine:
    """What the request headers tell: method, path (with its query), headers by lower name."""

    method: str
    path: str
    headers: Mapping[str, str]

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str], names: frozenset[str]) -> RequestLine:
        """The request line as the body-first layout's attributes give it."""
        headers = {
            n: attributes[header_attribute(n)] for n in names if header_attribute(n) in attributes
        }
        if ID_ATTRIBUTE in attributes:
            headers[REQUEST_ID_HEADER] = attributes[ID_ATTRIBUTE]
        return cls(
            attributes.get(METHOD_ATTRIBUTE, ""), attributes.get(PATH_ATTRIBUTE, ""), headers
        )

    @property
    def request_id(self) -> str:
        return self.headers.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID]

    def caller(self, keep: frozenset[str]) -> Caller:
        return caller_from(self.headers, keep)


def is_success(status: int) -> bool:
    return 200 <= status < 300


def media_type(content_type: str) -> str:
    """``text/event-stream; charset=utf-8`` → ``text/event-stream``."""
    return content_type.partition(";")[0].strip().lower()


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <t>`` or ``bearer <t>`` (value and token trimmed), else ``None``."""
    if authorization is None:
        return None
    authorization = authorization.lstrip()
    for scheme in ("Bearer ", "bearer "):
        if authorization.startswith(scheme):
            return authorization[len(scheme) :].strip() or None
    return None


def caller_from(headers: Mapping[str, str], keep: frozenset[str]) -> Caller:
    """The caller: its token and only the headers the principal source reads."""
    kept = {name: value for name, value in headers.items() if name in keep}
    token = bearer_token(headers.get("authorization")) or api_key(headers.get(API_KEY_HEADER))
    return Caller(token, kept)


def api_key(value: str | None) -> str | None:
    """An ``x-api-key`` value, trimmed; ``None`` when absent or blank."""
    return None if value is None else value.strip() or None
