"""Vocabularies (no weights) for checking grammars with llama.cpp itself."""

from __future__ import annotations

import pytest

from ggufchat.models.embedded import embedded_model_path


@pytest.fixture(scope="session")
def vocab():
    from tests.formats.gbnf import Vocab

    v = Vocab(embedded_model_path())
    yield v
    v.close()


@pytest.fixture(scope="session")
def qwen_vocab(qwen_path):
    """Qwen2.5-Coder's vocabulary, whose <tool_call> is one special token (the offline test model,
    tests/conftest.py)."""
    from tests.formats.gbnf import Vocab

    v = Vocab(qwen_path)
    yield v
    v.close()
