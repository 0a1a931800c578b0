"""The ``EXTPROC_TOKENIZERS`` map: model alias to tokenizer file, read once by the settings.

It lives apart from the tokenizer adapters so that reading the configuration loads no
tokenizer library.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.core import codec


def parse_tokenizer_map(text: str) -> dict[str, str]:
    """``alias=path`` pairs separated by commas, or a JSON object; every problem reported at once.

    Raises ``ValueError`` listing each bad entry (empty alias or path, missing ``=``, duplicates).
    """
    text = text.strip()
    if not text:
        return {}
    pairs = _json_pairs(text) if text[0] in "{[" else _comma_pairs(text)
    mapping: dict[str, str] = {}
    problems = []
    for number, (alias, path) in enumerate(pairs, start=1):
        problem = _pair_problem(alias, path, mapping)
        if problem:
            problems.append(f"entry {number} ({alias or '?'}={path or '?'}): {problem}")
        else:
            mapping[alias] = path
    if problems:
        raise ValueError("bad tokenizer map: " + "; ".join(problems))
    return mapping


def _pair_problem(alias: str, path: str, seen: Mapping[str, str]) -> str:
    if not alias and not path:
        return "empty entry, expected alias=path"
    if not alias:
        return "empty model alias"
    if not path:
        return "empty tokenizer path"
    if alias in seen:
        return "model alias mapped twice"
    return ""


def _comma_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in text.split(","):
        alias, sep, path = entry.partition("=")
        pairs.append((alias.strip(), path.strip() if sep else ""))
    return pairs


def _json_pairs(text: str) -> list[tuple[str, str]]:
    try:
        value = codec.loads(text)
    except codec.JSONDecodeError as exc:
        raise ValueError(f"bad tokenizer map: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError("bad tokenizer map: expected a JSON object of alias to path")
    return [(k.strip(), v.strip() if isinstance(v, str) else "") for k, v in value.items()]
