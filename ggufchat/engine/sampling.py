"""Sampling parameters and the llama.cpp sampler chain built from them (one chain per sequence)."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random
import re

import llama_cpp
import numpy as np

from ggufchat.engine.tokens import encode_text
from ggufchat.errors import InvalidParameter


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None = the engine's --seed, else random
    grammar: str | None = None  # GBNF the output must match (root rule "root"), e.g. from a JSON schema
    # With `grammar`: the grammar is lazy. The output is free until one of these regular expressions
    # (Python's re; `$` is the end of the output so far) is found in it; from the first non-empty group
    # of the match (or the match) on, it must match the grammar. llama.cpp's lazy-grammar semantics.
    # Tool calls: free text, then `<tool_call>{...}` under the tools' grammar (formats/grammar.py).
    grammar_triggers: list[str] | None = None
    grammar_param: str = "response_format"  # the request field a bad grammar is blamed on ("tools", ...)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature", ">= 0"),
            (self.top_k >= 0, "top_k", ">= 0"),
            (0 <= self.top_p <= 1, "top_p", "between 0 and 1"),
            (0 <= self.min_p <= 1, "min_p", "between 0 and 1"),
            (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty), "repeat_penalty", "> 0"),
            (self.repeat_last_n >= -1, "repeat_last_n", ">= -1"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "between -2 and 2"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "between -2 and 2"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed", "between 0 and 2**32-1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise InvalidParameter(f"{name} must be {rule}, not {getattr(self, name)!r}", param=name)
        if self.grammar_triggers is not None:
            self._validate_triggers(self.grammar_triggers)

    def _validate_triggers(self, triggers: list[str]) -> None:
        param = self.grammar_param
        if self.grammar is None:
            raise InvalidParameter("grammar triggers need a grammar", param=param)
        if not triggers or len(triggers) > MAX_TRIGGERS:
            raise InvalidParameter(f"a lazy grammar needs 1 to {MAX_TRIGGERS} triggers", param=param)
        for trigger in triggers:
            if not isinstance(trigger, str) or not trigger or len(trigger) > MAX_TRIGGER_CHARS:
                raise InvalidParameter(f"a grammar trigger must be a regular expression of 1 to {MAX_TRIGGER_CHARS} "
                                       f"characters, not {trigger!r:.80}", param=param)
            try:
                re.compile(trigger)
            except re.error as exc:
                raise InvalidParameter(f"the grammar trigger {trigger!r:.80} is not a regular expression: {exc}",
                                       param=param) from exc

    @property
    def needs_chain(self) -> bool:
        return self.temperature > 0 or self.has_penalties or self.grammar is not None

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


MAX_TRIGGERS = 32
MAX_TRIGGER_CHARS = 4096


class Sampler:
    """Picks a sequence's next token from the logits of one batch row. One per sequence."""

    def sample(self, ctx, batch_index: int) -> int:
        raise NotImplementedError

    def free(self) -> None:
        pass


class ChainSampler(Sampler):
    def __init__(self, chain) -> None:
        self.chain = chain

    def sample(self, ctx, batch_index: int) -> int:
        return llama_cpp.llama_sampler_sample(self.chain, ctx, batch_index)

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


# llama_get_logits_ith returning a plain address: the bindings' LP_c_float result would need
# np.ctypeslib.as_array, which builds a ctypes array type on every call: a large part of the engine's
# Python time per single-sequence step (docs/benchmarks.md, costs behind design choices).
_logits_ith = llama_cpp.llama_cpp._lib["llama_get_logits_ith"]  # a fresh function object, not the bindings'
_logits_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
_logits_ith.restype = ctypes.c_void_p


class LogitsRows:
    """numpy views of logits rows, by address. A view is made the first time llama.cpp hands out a row
    address and reused after; only the address it has just returned is ever read, so a view left over
    from a reallocated buffer is never looked at."""

    _MAX = 1024

    def __init__(self, n_vocab: int) -> None:
        self.row_type = ctypes.c_float * n_vocab
        self.views: dict[int, np.ndarray] = {}

    def row(self, ctx, batch_index: int) -> np.ndarray:
        addr = _logits_ith(ctx, batch_index)
        if not addr:
            raise RuntimeError(f"llama.cpp has no logits for batch index {batch_index}")
        view = self.views.get(addr)
        if view is None:
            if len(self.views) >= self._MAX:
                self.views.clear()
            view = self.views[addr] = np.frombuffer(self.row_type.from_address(addr), dtype=np.float32)
        return view


def logits_block(ctx, batch_index: int, count: int, n_vocab: int) -> np.ndarray:
    """The logits rows of `count` consecutive batch tokens that all asked for logits, from
    `batch_index` on, as one [count, n_vocab] view (valid until the next decode). Reading a row puts
    llama.cpp's outputs back in batch order first (output_reorder), so those rows lie one after the
    other from the first one's address."""
    addr = _logits_ith(ctx, batch_index)
    if not addr:
        raise RuntimeError(f"llama.cpp has no logits for batch index {batch_index}")
    block = (ctypes.c_float * (count * n_vocab)).from_address(addr)
    return np.frombuffer(block, dtype=np.float32).reshape(count, n_vocab)


class ArgmaxSampler(Sampler):
    """Plain greedy decoding, straight off the logits: llama.cpp's greedy chain first copies the whole
    vocabulary into a candidate array, several times the cost of an argmax over the row
    (docs/benchmarks.md, costs behind design choices).
    Ties go to the lowest id, as in llama.cpp's greedy sampler."""

    def __init__(self, n_vocab: int, banned_tokens: list[int] | None) -> None:
        self.n_vocab = n_vocab
        self.banned = np.array(banned_tokens or [], dtype=np.int64)
        self.rows = LogitsRows(n_vocab)

    def sample(self, ctx, batch_index: int) -> int:
        logits = self.rows.row(ctx, batch_index)
        if self.banned.size:
            logits[self.banned] = -np.inf  # this step's logits row; nothing reads it after us
        return int(logits.argmax())


# llama_token_data as numpy sees it: {int32 id; float logit; float p}, 12 bytes, no padding.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarSampler(Sampler):
    """Sampling under a grammar, checked after the fact, as llama.cpp's own common sampler does: the
    sampler chain picks a token from the unconstrained logits and the grammar only has to accept that
    one token; only when it refuses is the grammar applied to the whole vocabulary and the token
    picked again. Applying a grammar costs a match of every vocabulary token against every live
    alternative, milliseconds to seconds a step on the engine thread, where every other sequence
    waits; checking one token costs microseconds. Greedy picks the same token either way (the best
    token is the best allowed one whenever the grammar allows it)."""

    def __init__(self, grammar, chain, n_vocab: int) -> None:
        self.grammar = grammar
        self.chain = chain
        self.rows = LogitsRows(n_vocab)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.one = np.zeros(1, dtype=_TOKEN_DATA)
        ptr = ctypes.POINTER(llama_cpp.llama_token_data)
        self.all = llama_cpp.llama_token_data_array(self.cand.ctypes.data_as(ptr), n_vocab, -1, False)
        self.single = llama_cpp.llama_token_data_array(self.one.ctypes.data_as(ptr), 1, -1, False)

    def _pick(self, logits: np.ndarray, *, constrained: bool, exclude: list[int] | None = None) -> int:
        cand, arr = self.cand, self.all
        cand["id"] = self.ids
        cand["logit"] = logits
        cand["p"] = 0.0
        if exclude:
            cand["logit"][exclude] = -np.inf
        arr.size, arr.selected, arr.sorted = len(cand), -1, False
        if constrained:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        return arr.data[arr.selected].id  # through the pointer: a sampler may have moved the data

    def _allowed(self, token: int, grammar=None) -> bool:
        """Whether `grammar` (default: ours) accepts `token` next; never changes the grammar's state."""
        self.one[0] = (token, 1.0, 0.0)
        self.single.size, self.single.selected, self.single.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(grammar or self.grammar, ctypes.byref(self.single))
        return bool(np.isfinite(self.one["logit"][0]))

    def sample(self, ctx, batch_index: int) -> int:
        logits = self.rows.row(ctx, batch_index)
        token = self._pick(logits, constrained=False)
        if not self._allowed(token):
            token = self._pick(logits, constrained=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        for name in ("grammar", "chain"):
            smpl = getattr(self, name)
            if smpl is not None:
                llama_cpp.llama_sampler_free(smpl)
                setattr(self, name, None)


def _end_anchored(pattern: str) -> re.Pattern:
    """A trigger pattern compiled so that a final `$` means the end of the output, as in ECMAScript (in
    Python it would also match before a final newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


class LazyGrammarSampler(GrammarSampler):
    """A grammar that applies only once a trigger pattern matches the output (the semantics of llama.cpp's
    lazy grammar, `llama_sampler_init_grammar_lazy_patterns`), checked after sampling like GrammarSampler.

    llama.cpp's own lazy grammar is not used, for two reasons:
    - it searches every pattern through the whole output so far at every token: time per token grows
      with the output (quadratic over a reply), on the engine thread that all sequences share;
    - if the grammar refuses the text from the match on (the token that completes a trigger may carry
      more text), llama.cpp throws a C++ exception through its C API, and the process aborts.
    So the patterns are searched here, in the last WINDOW bytes of the output (a new match ends in the
    newest token). When the token just sampled completes a match, the text from the match's start is
    spelled in tokens and fed to a clone of the grammar; if the grammar refuses it, that token is masked
    and another picked; if it accepts it, the clone is the grammar from then on."""

    WINDOW = 2048  # bytes of output searched for a new match: far more than any trigger spans

    def __init__(self, probe, chain, n_vocab: int, *, triggers: list[str], tokenizer) -> None:
        super().__init__(None, chain, n_vocab)  # no grammar until a trigger fires
        self.probe = probe  # the grammar in its start state, never advanced: cloned on a match
        self.patterns = [_end_anchored(t) for t in triggers]
        self.tokenizer = tokenizer
        self.pieces = tokenizer.special_pieces()
        self.out = bytearray()  # the output so far (its last WINDOW bytes are all that is searched)

    def _fed_text(self, token: int) -> bytes | None:
        """The text the grammar would start on if `token` were accepted now, or None: no trigger yet."""
        out = self.out[-self.WINDOW:] + self.pieces[token]
        cut = len(self.out) > self.WINDOW
        # A leading NUL stands for the cut-off output: `^` (the start of the output) cannot match there.
        text = ("\0" if cut else "") + out.decode("utf-8", errors="replace")
        for pattern in self.patterns:
            m = pattern.search(text, 1 if cut else 0)
            if m:
                groups = [i for i in range(1, (m.lastindex or 0) + 1) if m.group(i)]
                return text[m.start(groups[0]) if groups else m.start():].encode("utf-8")
        return None

    def started(self, text: bytes):
        """A clone of the grammar that has accepted `text`, or None when it refuses it (never throws)."""
        ids = self.tokenizer.spell(text)
        if ids is None:
            return None
        clone = llama_cpp.llama_sampler_clone(self.probe)
        for tok in ids:
            if not self._allowed(tok, clone):
                llama_cpp.llama_sampler_free(clone)
                return None
            llama_cpp.llama_sampler_accept(clone, tok)
        return clone

    def sample(self, ctx, batch_index: int) -> int:
        if self.grammar is not None:
            return super().sample(ctx, batch_index)
        logits = self.rows.row(ctx, batch_index)
        refused: list[int] = []
        while True:  # ends: a token that completes no trigger is always left
            token = self._pick(logits, constrained=False, exclude=refused)
            fed = self._fed_text(token)
            if fed is None:
                break
            self.grammar = self.started(fed)
            if self.grammar is not None:
                break
            refused.append(token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        if self.grammar is None:
            self.out += self.pieces[token]
            del self.out[:-2 * self.WINDOW]  # keep it bounded; WINDOW is all that is read
        return token

    def free(self) -> None:
        super().free()
        if self.probe is not None:
            llama_cpp.llama_sampler_free(self.probe)
            self.probe = None


def make_sampler(params: SamplingParams, *, n_vocab: int, n_ctx_seq: int, default_seed: int | None,
                 banned_tokens: list[int] | None = None, vocab=None, history: list[int] | None = None,
                 tokenizer=None) -> Sampler:
    """`history`: tokens already in the sequence (the prompt), which the penalties look back on.
    `tokenizer` (a tokens.Tokenizer): needed for a lazy grammar (grammar_triggers)."""
    if not params.needs_chain:
        return ArgmaxSampler(n_vocab, banned_tokens)
    if params.grammar is None:
        return ChainSampler(build_chain(params, n_vocab=n_vocab, n_ctx_seq=n_ctx_seq, default_seed=default_seed,
                                        banned_tokens=banned_tokens, vocab=vocab, history=history))
    if params.grammar_triggers and tokenizer is None:
        raise ValueError("a lazy grammar needs the tokenizer")
    owned = []  # freed if anything below fails
    try:
        owned.append(grammar_sampler(vocab, params.grammar, params.grammar_param))  # or a lazy one's probe
        unconstrained = dataclasses.replace(params, grammar=None, grammar_triggers=None)
        owned.append(build_chain(unconstrained, n_vocab=n_vocab, n_ctx_seq=n_ctx_seq, default_seed=default_seed,
                                 banned_tokens=banned_tokens, vocab=vocab, history=history))
        grammar, chain = owned
        if not params.grammar_triggers:
            return GrammarSampler(grammar, chain, n_vocab)
        return LazyGrammarSampler(grammar, chain, n_vocab, triggers=params.grammar_triggers, tokenizer=tokenizer)
    except BaseException:
        for smpl in owned:
            llama_cpp.llama_sampler_free(smpl)
        raise


def grammar_sampler(vocab, grammar: str, param: str = "response_format"):
    """A llama.cpp grammar sampler, or InvalidParameter (naming `param`) when llama.cpp cannot parse the
    grammar."""
    smpl = llama_cpp.llama_sampler_init_grammar(vocab, encode_text(grammar), b"root")
    if not smpl:
        raise InvalidParameter("the grammar could not be parsed", param=param)
    return smpl


def build_chain(params: SamplingParams, *, n_vocab: int, n_ctx_seq: int, default_seed: int | None,
                banned_tokens: list[int] | None = None, vocab=None,
                history: list[int] | None = None) -> ctypes.c_void_p:
    """A sampler chain in llama.cpp's default order: bias, penalties, grammar, top-k, top-p, min-p, temp,
    dist.

    The caller owns the result and frees it with llama_sampler_free.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if banned_tokens:
        biases = (llama_cpp.llama_logit_bias * len(banned_tokens))()
        for i, tok in enumerate(banned_tokens):
            biases[i].token = tok
            biases[i].bias = -math.inf
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(banned_tokens), biases))
    if params.has_penalties:
        last_n = n_ctx_seq if params.repeat_last_n == -1 else params.repeat_last_n
        add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        # The prompt counts for the penalties, and only for them: the samplers added after this line
        # (the grammar above all) must see generated tokens only.
        for tok in history or ():
            llama_cpp.llama_sampler_accept(chain, tok)
    if params.grammar is not None:  # applied at every step; grammar_triggers are make_sampler's
        add(chain, grammar_sampler(vocab, params.grammar, params.grammar_param))
    if params.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else default_seed
    if seed is None:
        seed = random.getrandbits(32)
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
