"""Running GBNF grammars through llama.cpp's own grammar sampler, on a vocabulary loaded without
weights: does llama.cpp parse a grammar, and does it accept a text token by token (as sampling would)?
The lazy grammar's trigger is emulated first (formats.grammar.trigger_start) and the text it would
replay checked against the grammar, because llama.cpp throws (and through ctypes aborts the process)
when a triggered grammar refuses the replayed text."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from ggufchat.formats.grammar import trigger_start


class Vocab:
    def __init__(self, path) -> None:
        from ggufchat.engine.backend import BACKEND

        BACKEND.ensure_ready()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"cannot load the vocabulary of {path}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, special)
        assert n >= 0
        return list(buf[:n])

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n].decode("utf-8", "surrogateescape")

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)

    # -- samplers

    def grammar(self, text: str):
        return llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode(), b"root")

    def lazy_grammar(self, text: str, patterns: list[str]):
        arr = (ctypes.c_char_p * len(patterns))(*[p.encode() for p in patterns])
        return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            self.vocab, text.encode(), b"root", arr, len(patterns), None, 0)

    @staticmethod
    def allowed(smpl, token: int) -> bool:
        data = llama_cpp.llama_token_data(token, 1.0, 0.0)
        arr = llama_cpp.llama_token_data_array(ctypes.pointer(data), 1, -1, False)
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return data.logit != float("-inf")

    def feed(self, smpl, tokens: list[int]) -> bool:
        """Accept tokens while the grammar allows them; False at the first it refuses."""
        for token in tokens:
            if not self.allowed(smpl, token):
                return False
            llama_cpp.llama_sampler_accept(smpl, token)
        return True

    def accepts(self, grammar: str, text: str, *, complete: bool = True, special: bool = False) -> bool:
        """Whether the grammar accepts text (complete: and may end there)."""
        smpl = self.grammar(grammar)
        assert smpl, "llama.cpp could not parse the grammar"
        try:
            return self.feed(smpl, self.tokenize(text, special=special)) and (
                not complete or self.allowed(smpl, self.eos))
        finally:
            llama_cpp.llama_sampler_free(smpl)


@dataclass
class LazyRun:
    triggered_at: int | None  # index of the token that fired a trigger
    replay: str | None  # the text the grammar was fed from the trigger on
    followed: bool  # every token after the trigger was allowed
    may_end: bool  # the end of generation is allowed at the end
    free_after: bool  # a token the call grammar never allows ("zz") is still allowed: not triggered


def lazy_run(vocab: Vocab, grammar: str, patterns: list[str], text: str, *, special: bool = False) -> LazyRun:
    tokens = vocab.tokenize(text, special=special)
    buffer, fired, replay = "", None, None
    for i, token in enumerate(tokens):
        buffer += vocab.piece(token)
        start = trigger_start(patterns, buffer)
        if start is not None:
            fired, replay = i, buffer[start:]
            # The replay must be a prefix the grammar accepts, or llama.cpp would abort the process.
            assert vocab.accepts(grammar, replay, complete=False, special=special), f"replay refused: {replay!r}"
            break
    smpl = vocab.lazy_grammar(grammar, patterns)
    assert smpl, "llama.cpp could not parse the lazy grammar or its patterns"
    try:
        end = len(tokens) if fired is None else fired + 1
        for token in tokens[:end]:
            llama_cpp.llama_sampler_accept(smpl, token)
        followed = vocab.feed(smpl, tokens[end:])
        may_end = vocab.allowed(smpl, vocab.eos)
        probe = vocab.tokenize("zz")[0]
        free_after = vocab.allowed(smpl, probe)
        return LazyRun(fired, replay, followed, may_end, free_after)
    finally:
        llama_cpp.llama_sampler_free(smpl)
