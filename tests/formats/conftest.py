"""Vocabularies (no weights) for checking grammars with llama.cpp itself."""

from __future__ import annotations

import pytest

from ggufchat.models.embedded import embedded_model_path
from tests.conftest import ROOT


@pytest.fixture(scope="session")
def vocab():
    from tests.formats.gbnf import Vocab

    v = Vocab(embedded_model_path())
    yield v
    v.close()


@pytest.fixture(scope="session")
def qwen_vocab():
    """Qwen2.5-Coder's vocabulary, whose <tool_call> is one special token; only when the offline
    test model is already assembled (scripts/offline_models.py), never downloading it here."""
    import sys

    from tests.formats.gbnf import Vocab

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import offline_models
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    path = offline_models.path_of("qwen2.5-coder-0.5b")
    if not path.is_file():
        pytest.skip("the offline Qwen2.5-Coder model is not assembled (make install)")
    v = Vocab(path)
    yield v
    v.close()
