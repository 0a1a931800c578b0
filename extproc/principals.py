"""What a principal source may be: the one parser every setting, resolver and check goes through.

Rules:
* a source is ``api_keys``, ``key_hash`` or ``header:<name>``; nothing else is accepted;
* a header name is an RFC 9110 token (letters, digits and ``!#$%&'*+-.^_`|~``), lower-cased,
  with surrounding whitespace dropped;
* names that cannot carry a tenant safely are refused, each with its reason: pseudo-headers,
  hop-by-hop headers, headers that describe or route the request itself, the client's own
  credentials, and headers Envoy sets or reserves itself. Envoy removes every client copy of
  the principal header before the ext_proc filter, so stripping one of these would either break
  every request or leave a value the client chose.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NewType

HeaderName = NewType("HeaderName", str)
"""A validated, lower-cased header name that may carry a principal."""

# The name the shipped Envoy configurations strip and the documentation uses.
DEFAULT_PRINCIPAL_HEADER = HeaderName("x-extproc-principal")
SOURCE_FORMS = "api_keys, key_hash or header:<name>"

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_HOP_BY_HOP = (
    "a hop-by-hop header: Envoy consumes or rewrites it per connection, so it never reaches "
    "the ext_proc filter as the client or an authentication filter set it"
)
_BODY = "it describes the request body: removing the client's copy would break every request"
_CREDENTIALS = (
    "it carries the client's own credentials: the secret would become the principal (and be "
    "stored with every cache entry), and removing the client's copy would break authentication"
)
_ENVOY_SET = "Envoy sets it itself from the connection or the request; it never names a tenant"
_REFUSED: dict[str, str] = {
    "connection": _HOP_BY_HOP,
    "keep-alive": _HOP_BY_HOP,
    "proxy-connection": _HOP_BY_HOP,
    "te": _HOP_BY_HOP,
    "trailer": _HOP_BY_HOP,
    "transfer-encoding": _HOP_BY_HOP,
    "upgrade": _HOP_BY_HOP,
    "content-length": _BODY,
    "content-type": _BODY,
    "content-encoding": _BODY,
    "host": "it is the request's authority: removing the client's copy would break routing",
    "authorization": _CREDENTIALS,
    "proxy-authorization": _CREDENTIALS,
    "x-api-key": _CREDENTIALS,
    "cookie": "it is client state, and the shipped Envoy configurations never forward it to "
    "ext_proc (forward_rules)",
    "x-request-id": _ENVOY_SET,
    "x-forwarded-for": _ENVOY_SET,
    "x-forwarded-proto": _ENVOY_SET,
}
_ENVOY_PREFIX = "x-envoy-"


class PrincipalKind(enum.Enum):
    """Where the billing principal comes from (DESIGN §6)."""

    API_KEYS = "api_keys"
    HEADER = "header"
    KEY_HASH = "key_hash"


@dataclass(frozen=True, slots=True)
class PrincipalSource:
    """The principal source; ``header`` is the trusted header's name for ``HEADER``."""

    kind: PrincipalKind
    header: HeaderName | None = None

    def __post_init__(self) -> None:
        if (self.kind is PrincipalKind.HEADER) != (self.header is not None):
            raise ValueError("a header name goes with the header source, and only with it")

    def __str__(self) -> str:
        return f"header:{self.header}" if self.kind is PrincipalKind.HEADER else self.kind.value

    @property
    def stripped_header(self) -> HeaderName:
        """The header Envoy must remove from clients: this one, or the documented default."""
        return self.header if self.header is not None else DEFAULT_PRINCIPAL_HEADER


API_KEYS = PrincipalSource(PrincipalKind.API_KEYS)
"""The default source: the table of API keys."""


def parse_principal_source(text: str) -> PrincipalSource:
    """``api_keys``, ``key_hash`` or ``header:<name>``; ``ValueError`` says what is wrong."""
    text = text.strip()
    kind, colon, rest = text.partition(":")
    if colon:
        if kind != PrincipalKind.HEADER.value:
            raise ValueError(f"expected {SOURCE_FORMS}")
        return PrincipalSource(PrincipalKind.HEADER, parse_header_name(rest))
    try:
        parsed = PrincipalKind(text)
    except ValueError:
        raise ValueError(f"expected {SOURCE_FORMS}") from None
    if parsed is PrincipalKind.HEADER:
        raise ValueError("header needs a name: header:<name>")
    return PrincipalSource(parsed)


def parse_header_name(text: str) -> HeaderName:
    """A header name that may carry a principal, lower-cased; ``ValueError`` says why not."""
    name = text.strip()
    if not name:
        raise ValueError("header:<name> needs a header name")
    if name.startswith(":"):
        raise ValueError(
            f"{name!r} is a pseudo-header: it describes the request line, which the client "
            "chooses, and no authentication filter can vouch for it"
        )
    if not _TOKEN.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an HTTP header name (RFC 9110 token: letters, digits and "
            "!#$%&'*+-.^_`|~)"
        )
    name = name.lower()
    reason = _REFUSED.get(name)
    if reason is None and name.startswith(_ENVOY_PREFIX):
        reason = "Envoy reserves x-envoy-* headers: it sets, trusts or removes them itself"
    if reason is not None:
        raise ValueError(f"{name!r} cannot carry the principal: {reason}")
    return HeaderName(name)
