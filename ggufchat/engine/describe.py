"""What a model can do, read without loading its weights: for listings of models that are not loaded
(a server's /api/show of any model it offers), where loading gigabytes to answer would evict others.

llama.cpp's `vocab_only` load reads the header and the vocabulary (milliseconds, a few MB), enough to
tokenize: so the same checks that run on a loaded engine (a fill-in-the-middle token is one special
token; an encoder cannot generate) run here on the real vocabulary, not on guesses from metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from ggufchat.engine.backend import BACKEND
from ggufchat.engine.loader import LoadOptions, context_size
from ggufchat.engine.templates import ChatTemplate
from ggufchat.engine.tokens import Tokenizer
from ggufchat.errors import InvalidModelFile, TemplateError
from ggufchat.models.gguf import GGUFInfo, read_gguf


@dataclass
class ModelFacts:
    """Enough of a model to describe it: its template, what it can do and the context a request gets."""

    path: Path
    info: GGUFInfo
    template: str  # the chat template's source ("" for a model that only embeds)
    supports_tools: bool
    generates: bool  # False: an encoder (BERT-style) that only embeds
    n_ctx_seq: int
    n_vocab: int
    fim: tuple[int, int, int] | None  # the fill-in-the-middle tokens, when the caller asked and it has them


def generates(info: GGUFInfo, model) -> bool:
    """A BERT-style encoder (non-causal attention, no decoder) embeds; it cannot continue a text."""
    return info.get(f"{info.architecture or ''}.attention.causal", True) is not False and (
        bool(llama_cpp.llama_model_has_decoder(model)) or not llama_cpp.llama_model_has_encoder(model))


def describe(options: LoadOptions, chat_template: str | None = None, chat_template_file: Path | None = None,
             fim=None) -> ModelFacts:
    """The facts of the model `options` load, from its header and vocabulary only. `fim(tokenize,
    metadata, n_vocab)`: the caller's fill-in-the-middle check, run while the vocabulary is loaded."""
    path = Path(options.model_path)
    info = read_gguf(path)
    BACKEND.ensure_ready()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise InvalidModelFile(f"llama.cpp could not read the vocabulary of {path}")
    try:
        tokenizer = Tokenizer(llama_cpp.llama_model_get_vocab(model))
        does_generate = generates(info, model)
        if chat_template_file:
            source = Path(chat_template_file).read_text(encoding="utf-8")
        elif chat_template:
            source = ChatTemplate.builtin(chat_template).source
        else:
            source = info.chat_template or ""
        try:
            tools = bool(source) and ChatTemplate(source).supports_tools
        except TemplateError:
            tools = False
        found = fim(tokenizer.tokenize, info.metadata, tokenizer.n_vocab) if fim is not None else None
        return ModelFacts(path, info, source if does_generate else "", tools, does_generate,
                          context_size(options, info) // options.n_seq_max, tokenizer.n_vocab, found)
    finally:
        llama_cpp.llama_model_free(model)
