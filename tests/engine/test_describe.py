"""A model described from its header and vocabulary alone (no weights loaded) says what the loaded
engine says."""

from __future__ import annotations

from ggufchat.engine import LoadOptions
from ggufchat.engine.describe import describe
from ggufchat.server.ollama_convert import fim_tokens


def test_described_facts_match_the_loaded_engine(qwen_path, qwen_engine, minilm_path, minilm_engine, model_path,
                                                 engine):
    for path, loaded in ((qwen_path, qwen_engine), (minilm_path, minilm_engine), (model_path, engine)):
        facts = describe(LoadOptions(model_path=path, n_seq_max=4, n_ctx=4096), fim=fim_tokens)
        assert facts.generates == loaded.generates
        assert facts.n_vocab == loaded.n_vocab and facts.n_ctx_seq == 1024
        if loaded.generates:
            assert facts.template == loaded.template.source
            assert facts.supports_tools == loaded.template.supports_tools
            assert facts.fim == fim_tokens(loaded.tokenize, facts.info.metadata, loaded.n_vocab)
        else:
            assert facts.template == "" and facts.fim is None
    assert describe(LoadOptions(model_path=qwen_path), fim=fim_tokens).fim is not None  # Qwen2.5-Coder fills in


def test_a_template_override_is_what_is_described(model_path):
    facts = describe(LoadOptions(model_path=model_path), chat_template="gemma")
    assert "<start_of_turn>" in facts.template and not facts.supports_tools
