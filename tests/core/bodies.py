"""Generated chat-completions bodies, and an oracle for what ``prepare`` must make of them.

A body is drawn as a small document model (objects keep duplicate names, scalars keep the text
they are written in), rendered with random white space, and the oracle works out from the
model alone what must be forwarded, which blocks, telemetry blocks and breakpoints must be
found and which rejection must be raised. Forwarded bodies are read back with the standard
library's parser, every number kept as its text and every object as its list of members, so
the checks do not rest on the reader under test.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from extproc.core import spans
from extproc.core.errors import RejectReason
from extproc.core.model import RequestPolicy, Tier, TierPolicy

MARKER = "cache_control"
PREFIX = "x-anthropic-billing-header:"

# ---- the document model ----


@dataclass(frozen=True)
class Raw:
    """A scalar, or a value the oracle never looks into, exactly as written."""

    text: str


@dataclass(frozen=True)
class Obj:
    """An object: its members in order, each name as a JSON string literal (escapes kept)."""

    members: tuple[tuple[str, Doc], ...] = ()

    def named(self, name: str) -> list[Doc]:
        return [value for key, value in self.members if decode_name(key) == name]

    def last(self, name: str) -> Doc | None:
        found = self.named(name)
        return found[-1] if found else None


@dataclass(frozen=True)
class Arr:
    items: tuple[Doc, ...] = ()


Doc = Raw | Obj | Arr


def decode_name(key: str) -> str:
    name: str = json.loads(key)
    return name


def as_str(doc: Doc | None) -> str | None:
    """The string a ``Raw`` spells, ``None`` for anything else."""
    if isinstance(doc, Raw) and doc.text.startswith('"'):
        text: str = json.loads(doc.text)
        return text
    return None


def key(name: str) -> str:
    return json.dumps(name)


def obj(**members: Doc) -> Obj:
    return Obj(tuple((key(name), value) for name, value in members.items()))


def text(value: str) -> Raw:
    return Raw(json.dumps(value))


NULL, TRUE, FALSE = Raw("null"), Raw("true"), Raw("false")


def render(doc: Doc, gaps: Sequence[str] = ("",)) -> str:
    """The JSON text of ``doc``, with ``gaps`` (white space) cycled between its tokens."""
    out: list[str] = []
    _render(doc, out, itertools.cycle(gaps))
    return "".join(out)


def _render(doc: Doc, out: list[str], gap: Iterator[str]) -> None:
    if isinstance(doc, Raw):
        out.append(doc.text)
        return
    if isinstance(doc, Obj):
        out.append("{")
        for i, (name, value) in enumerate(doc.members):
            out.append(("," if i else "") + next(gap) + name + next(gap) + ":" + next(gap))
            _render(value, out, gap)
        out.append(next(gap) + "}")
        return
    out.append("[")
    for i, item in enumerate(doc.items):
        out.append(("," if i else "") + next(gap))
        _render(item, out, gap)
    out.append(next(gap) + "]")


_INSIGNIFICANT = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\n\r]+', re.DOTALL)


def squeeze(text: str) -> str:
    """``text`` without the white space between tokens (strings untouched)."""
    return _INSIGNIFICANT.sub(lambda m: m.group(1) or "", text)


# ---- hostile values ----

DEPTH = 3000
DEEP = (
    '{"deep_array":' + "[" * DEPTH + "]" * DEPTH + "}",
    '{"deep_object":' + '{"a":' * DEPTH + "1" + "}" * DEPTH + "}",
    '{"deep_markers":' + '[{"cache_control":' * DEPTH + "null" + "}]" * DEPTH + "}",
)
HOSTILE_NUMBERS = (
    "1180591620717411303424",
    "-1180591620717411303424",
    "1e400",
    "-1e400",
    "1E+400",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "0.1000000000000000055511151231257827",
    "1.5e-400",
    "9" * 4100,
)
HOSTILE_STRINGS = (
    r'"\ud800"',
    r'"\udfff\ud800x"',
    r'"\u00e9\/\"\\"',
    '"é日本🙂"',
    '"\udcff\udcfeinvalid utf-8"',  # bytes FF FE once encoded: not UTF-8
    '"cache_control"',
)
hostile = st.sampled_from([*HOSTILE_NUMBERS, *HOSTILE_STRINGS, *DEEP]).map(Raw)
plain = st.sampled_from(["0", "1.5", "true", "false", "null", '"x"', "[]", "{}"]).map(Raw)
nested_marker = st.just(Raw('{"meta":{"cache_control":{"type":"ephemeral"}}}'))
extra_values = hostile | plain | nested_marker
extra_names = st.sampled_from(["metadata", "n", "x\u00e9", "user", "seed"]).map(key)
extras = st.lists(st.tuples(extra_names, extra_values), max_size=2)

# ---- markers ----

MARKERS: dict[str, Tier | None] = {
    "null": None,
    '{"type":"ephemeral"}': None,  # the policy's default tier
    '{"type":"ephemeral","ttl":"5m"}': Tier.M5,
    '{"ttl":"1h","type":"ephemeral"}': Tier.H1,
    '{"type":"ephemeral","ttl":"24h","scope":"x"}': Tier.H24,
}
markers = st.sampled_from(sorted(MARKERS)).map(Raw)
marker_names = st.sampled_from([key(MARKER), key(MARKER), r'"cache\u005fcontrol"'])


def marker_tier(doc: Doc | None, policy: RequestPolicy) -> Tier | None:
    """The tier a generated marker asks for (``None``: no marker)."""
    if doc is None or doc == NULL:
        return None
    assert isinstance(doc, Raw)
    return MARKERS[doc.text] or policy.tiers.default


@st.composite
def with_markers(draw: st.DrawFn, members: list[tuple[str, Doc]]) -> Obj:
    """``members`` plus, sometimes, one or two markers at random places."""
    out = list(members)
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    for _ in range(count):
        out.insert(draw(st.integers(0, len(out))), (draw(marker_names), draw(markers)))
    return Obj(tuple(out))


# ---- bodies ----

ROLES = ["system", "system", "user", "assistant", "assistant", "tool", "developer"]
texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
telemetry_texts = st.builds(
    lambda ws, rest: ws + PREFIX + rest, st.sampled_from(["", " ", "\n\t "]), texts
)


@st.composite
def content_blocks(draw: st.DrawFn, role: str) -> Doc:
    kinds = ["text", "telemetry", "image", "scalar"]
    if role == "system":
        kinds = ["text", "telemetry", "telemetry", "telemetry", "image"]
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        return draw(extra_values)
    members: list[tuple[str, Doc]]
    if kind == "image":
        members = [(key("type"), text("image_url")), (key("image_url"), obj(url=text("u")))]
    else:
        body = draw(telemetry_texts if kind == "telemetry" else texts)
        members = [(key("type"), text("text")), (key("text"), text(body))]
    members += draw(extras)
    result: Obj = draw(with_markers(members))
    return result


TOOL = obj(
    type=text("function"),
    function=obj(
        name=text("lookup"),
        parameters=Raw('{"type":"object","properties":{"cache_control":{"type":"string"}}}'),
    ),
)
CALL = obj(id=text("call_1"), type=text("function"), function=Raw('{"name":"f","arguments":"{}"}'))


@st.composite
def entries(draw: st.DrawFn, entry: Obj) -> Arr:
    drawn: list[Doc] = draw(st.lists(with_markers([*entry.members, *draw(extras)]), max_size=2))
    if draw(st.booleans()):
        drawn.append(draw(extra_values))  # an entry that is not an object
    return Arr(tuple(drawn))


@st.composite
def messages(draw: st.DrawFn) -> Doc:
    if draw(st.integers(0, 9)) == 0:
        return draw(extra_values)  # not a message object
    role = draw(st.sampled_from(ROLES))
    members: list[tuple[str, Doc]] = [(key("role"), text(role))]
    content = draw(st.sampled_from(["string", "array", "array", "null", "absent", "odd", "twice"]))
    for _ in range(2 if content == "twice" else 1 if content != "absent" else 0):
        if content == "string":
            value: Doc = text(draw(texts))
        elif content == "null":
            value = NULL
        elif content == "odd":
            value = draw(extra_values)
        else:
            value = Arr(tuple(draw(st.lists(content_blocks(role), max_size=3))))
        members.append((key("content"), value))
    if draw(st.integers(0, 2)) == 0:
        members.append((key("tool_calls"), draw(entries(CALL))))
    if draw(st.integers(0, 4)) == 0:
        members.append((key(MARKER), draw(markers)))  # on the message: content
    members += draw(extras)
    return Obj(tuple(draw(st.permutations(members))))


STREAM_OPTIONS = ["null", "{}", '{"include_usage":false}', '{"include_usage":true,"x":1}', '"s"']


@st.composite
def chat_bodies(draw: st.DrawFn) -> Obj:
    """A chat body: tools, messages, tool calls, top-level markers, telemetry, hostile values."""
    members: list[tuple[str, Doc]] = [(key("model"), text("m"))]
    members.append((key("messages"), Arr(tuple(draw(st.lists(messages(), max_size=4))))))
    if draw(st.integers(0, 5)) == 0:
        members.append((key("messages"), Arr(tuple(draw(st.lists(messages(), max_size=2))))))
    if draw(st.booleans()):
        members.append((key("tools"), draw(entries(TOOL))))
    if draw(st.booleans()):
        members.append((key("stream"), draw(st.sampled_from([TRUE, TRUE, FALSE]))))
    if draw(st.booleans()):
        members.append((key("stream_options"), Raw(draw(st.sampled_from(STREAM_OPTIONS)))))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        top = draw(st.sampled_from([NULL, *[Raw(m) for m in MARKERS if m != "null"]]))
        members.append((draw(marker_names), top))
    members += draw(extras)
    return Obj(tuple(draw(st.permutations(members))))


gaps = st.lists(st.sampled_from(["", "", " ", "\n", "\t", "\r\n  "]), min_size=1, max_size=6)
policies = st.sampled_from(
    [
        RequestPolicy(),
        RequestPolicy(strip_telemetry=False),
        RequestPolicy(telemetry_prefixes=()),
        RequestPolicy(TierPolicy(frozenset({Tier.M5, Tier.H1}), Tier.H1)),
        RequestPolicy(TierPolicy(frozenset({Tier.M5}))),
    ]
)


def encode(body: Obj, gaps: Sequence[str], bom: bool) -> bytes:
    return spans.encode(("\ufeff" if bom else "") + render(body, gaps))


# ---- the oracle ----


@dataclass
class Expected:
    """What ``prepare`` must do with a generated body."""

    forwarded: Obj
    telemetry: list[str] = field(default_factory=list)
    lookalikes: list[str] = field(default_factory=list)
    """Marked blocks that would be telemetry unmarked: once forwarded without their marker,
    a second ``prepare`` takes them for telemetry."""
    blocks: list[tuple[str, str, Tier | None]] = field(default_factory=list)
    breakpoints: list[tuple[int, Tier, bool]] = field(default_factory=list)
    rejection: RejectReason | None = None


class _Oracle:
    def __init__(self, policy: RequestPolicy) -> None:
        self.policy = policy
        self.tool_sites: list[tuple[str, str, Doc | None]] = []
        self.sites: list[tuple[str, str, Doc | None]] = []
        self.telemetry: list[str] = []
        self.lookalikes: list[str] = []

    def strip(self, entry: Doc) -> tuple[Doc, Doc | None]:
        """``entry`` without its markers, and its last marker."""
        if not isinstance(entry, Obj):
            return entry, None
        kept = tuple((k, v) for k, v in entry.members if decode_name(k) != MARKER)
        return Obj(kept), entry.last(MARKER)

    def entries(self, value: Doc, role: str, where: str, sites: list[Any] | None) -> Doc:
        if not isinstance(value, Arr):
            return value
        out = []
        for i, entry in enumerate(value.items):
            stripped, marker = self.strip(entry)
            out.append(stripped)
            if sites is not None:
                sites.append((role, f"{where}[{i}]", marker))
        return Arr(tuple(out))

    def message(self, message: Doc, where: str, effective: bool) -> Doc:
        if not isinstance(message, Obj):
            return message
        role = as_str(message.last("role")) or ""
        contents = len(message.named("content"))
        calls = len(message.named("tool_calls"))
        out: list[tuple[str, Doc]] = []
        call_sites: list[Any] = []  # after every content block of the message
        for name, value in message.members:
            if decode_name(name) == "content":
                contents -= 1
                value = self.content(value, role, f"{where}.content", effective and not contents)
            elif decode_name(name) == "tool_calls":
                calls -= 1
                last = effective and role == "assistant" and not calls
                sites = call_sites if last else None
                value = self.entries(value, "tool_call", f"{where}.tool_calls", sites)
            out.append((name, value))
        self.sites += call_sites
        return Obj(tuple(out))

    def content(self, value: Doc, role: str, where: str, effective: bool) -> Doc:
        if as_str(value) is not None:
            if effective:
                self.sites.append((role, where, None))
            return value
        if not isinstance(value, Arr):
            return value
        out = []
        for i, element in enumerate(value.items):
            stripped, marker = self.strip(element)
            if effective and self.is_telemetry(role, element, marker):
                self.telemetry.append(f"{where}[{i}]")
                if self.policy.strip_telemetry:
                    continue
            elif effective:
                self.sites.append((role, f"{where}[{i}]", marker))
                if self.is_telemetry(role, element, None):
                    self.lookalikes.append(f"{where}[{i}]")
            out.append(stripped)
        return Arr(tuple(out))

    def is_telemetry(self, role: str, element: Doc, marker: Doc | None) -> bool:
        if role != "system" or not isinstance(element, Obj) or marker not in (None, NULL):
            return False
        body = as_str(element.last("text"))
        return body is not None and body.lstrip().startswith(self.policy.telemetry_prefixes)


def expect(body: Obj, policy: RequestPolicy, query_automatic: bool) -> Expected:
    """What ``prepare(render(body), policy, query_automatic)`` must do."""
    oracle = _Oracle(policy)
    names = [decode_name(k) for k, _ in body.members]
    last_tools = max((i for i, n in enumerate(names) if n == "tools"), default=-1)
    last_messages = max((i for i, n in enumerate(names) if n == "messages"), default=-1)
    members: list[tuple[str, Doc]] = []
    for i, (name, value) in enumerate(body.members):
        if names[i] == MARKER:
            continue
        if names[i] == "tools":
            sites = oracle.tool_sites if i == last_tools else None
            value = oracle.entries(value, "tool_definition", "tools", sites)
        elif names[i] == "messages" and isinstance(value, Arr):
            effective = i == last_messages
            value = Arr(
                tuple(
                    oracle.message(m, f"messages[{j}]", effective)
                    for j, m in enumerate(value.items)
                )
            )
        members.append((name, value))
    if body.last("stream") == TRUE:
        members = _include_usage(members)
    expected = Expected(Obj(tuple(members)), oracle.telemetry, oracle.lookalikes)
    _breakpoints(
        expected, [*oracle.tool_sites, *oracle.sites], body.last(MARKER), policy, query_automatic
    )
    return expected


def _include_usage(members: list[tuple[str, Doc]]) -> list[tuple[str, Doc]]:
    flag = (key("include_usage"), TRUE)
    if not any(decode_name(k) == "stream_options" for k, _ in members):
        return [*members, (key("stream_options"), Obj((flag,)))]
    out = []
    for name, value in members:
        if decode_name(name) == "stream_options":
            value = _options(Obj(json_members(value)) if _is_object(value) else value, flag)
        out.append((name, value))
    return out


def _is_object(value: Doc) -> bool:
    return isinstance(value, Raw) and value.text.startswith("{")


def json_members(value: Doc) -> tuple[tuple[str, Doc], ...]:
    """The members of an object written as one ``Raw`` (the stream options)."""
    assert isinstance(value, Raw)
    pairs = json.loads(value.text, object_pairs_hook=list)
    return tuple((key(k), Raw(json.dumps(v))) for k, v in pairs)


def _options(value: Doc, flag: tuple[str, Doc]) -> Doc:
    if value == NULL:
        return Obj((flag,))
    if not isinstance(value, Obj):
        return value
    if not value.named("include_usage"):
        return Obj((*value.members, flag))
    return Obj(
        tuple((k, TRUE) if decode_name(k) == "include_usage" else (k, v) for k, v in value.members)
    )


def _breakpoints(
    expected: Expected,
    sites: list[tuple[str, str, Doc | None]],
    top: Doc | None,
    policy: RequestPolicy,
    query_automatic: bool,
) -> None:
    tiers = [marker_tier(marker, policy) for _, _, marker in sites]
    expected.blocks = [
        (role, where, tier) for (role, where, _), tier in zip(sites, tiers, strict=True)
    ]
    enabled = policy.tiers.enabled
    explicit = [(i, t, False) for i, t in enumerate(tiers) if t is not None]
    if any(t not in enabled for _, t, _ in explicit):
        expected.rejection = RejectReason.TIER_DISABLED
        return
    if len(explicit) > 4:
        expected.rejection = RejectReason.TOO_MANY_BREAKPOINTS
        return
    expected.breakpoints = explicit
    automatic = marker_tier(top, policy)
    if automatic is None and query_automatic:
        automatic = Tier.H1
    if automatic is None:
        return
    if automatic not in enabled:
        expected.rejection = RejectReason.TIER_DISABLED
    elif not tiers:
        return
    elif tiers[-1] is not None:
        if tiers[-1] is not automatic:
            expected.rejection = RejectReason.AUTOMATIC_TTL_CONFLICT
    elif len(explicit) == 4:
        expected.rejection = RejectReason.AUTOMATIC_NO_SLOT
    else:
        expected.breakpoints = [*explicit, (len(tiers) - 1, automatic, True)]


# ---- reading forwarded bodies back ----


@dataclass(frozen=True)
class Number:
    text: str


class Members(tuple[tuple[str, Any], ...]):
    """An object read back: every member, duplicates included, in order."""


def read_back(raw: bytes) -> Any:
    """``raw`` parsed by the standard library, numbers as text, objects as member lists."""
    body = spans.decode(raw).removeprefix("\ufeff")
    for i, deep in enumerate(DEEP):
        body = body.replace(deep, f'"<deep {i}>"')
    return json.loads(
        body,
        object_pairs_hook=Members,
        parse_int=Number,
        parse_float=Number,
        parse_constant=Number,
    )


def marker_locations(body: Any) -> Iterator[Members]:
    """Every object of a read-back body where a ``cache_control`` member is a marker."""
    if not isinstance(body, Members):
        return
    yield body
    for name, value in body:
        if name == "tools" and isinstance(value, list):
            yield from (e for e in value if isinstance(e, Members))
        if name == "messages" and isinstance(value, list):
            for message in value:
                yield from _message_locations(message)


def _message_locations(message: Any) -> Iterator[Members]:
    if not isinstance(message, Members):
        return
    for name, value in message:
        if name in ("content", "tool_calls") and isinstance(value, list):
            yield from (e for e in value if isinstance(e, Members))


def count_markers(value: Any) -> int:
    """``cache_control`` members anywhere in a read-back value."""
    if isinstance(value, list):
        return sum(count_markers(v) for v in value)
    if isinstance(value, Members):
        return sum((name == MARKER) + count_markers(v) for name, v in value)
    return 0
