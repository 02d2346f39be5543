"""Sampling parameters and the llama.cpp sampler chain built from them (one chain per sequence)."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import math
import random

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
    # With `grammar`: the grammar is lazy. The output is free until one of these strings appears in it;
    # from the start of that string on it must match the grammar (so the grammar begins with the
    # trigger text). Tool calls: free text, then `<tool_call>{...}` under the tools' grammar.
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
            if not isinstance(trigger, str) or not trigger or "\0" in trigger \
                    or len(encode_text(trigger)) > MAX_TRIGGER_BYTES:
                raise InvalidParameter(f"a grammar trigger must be a non-empty string of at most "
                                       f"{MAX_TRIGGER_BYTES} bytes without NUL, not {trigger!r:.80}", param=param)

    @property
    def needs_chain(self) -> bool:
        return self.temperature > 0 or self.has_penalties or self.grammar is not None

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


MAX_TRIGGERS = 32
MAX_TRIGGER_BYTES = 256


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
# np.ctypeslib.as_array, which builds a ctypes array type on every call (~25 us, a fifth of the
# engine's Python time per single-sequence step).
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
    vocabulary into a candidate array (~110 us a token here), an argmax over the row takes ~15 us.
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


# std::regex (ECMAScript) metacharacters: a trigger string is matched literally.
_REGEX_SPECIAL = frozenset(".^$|()*+?[]{}\\")


def trigger_pattern(trigger: str) -> bytes:
    """The regex llama.cpp's lazy grammar is given for a literal trigger string."""
    return encode_text("".join("\\" + c if c in _REGEX_SPECIAL else c for c in trigger))


class LazyGrammarSampler(GrammarSampler):
    """A grammar that applies only once a trigger string appears in the output (llama.cpp's lazy grammar,
    `llama_sampler_init_grammar_lazy_patterns`), checked after sampling like GrammarSampler.

    A lazy llama.cpp grammar appends every accepted token's text to a buffer and regex-searches the
    whole buffer for the triggers; on a match it feeds the grammar everything from the trigger's start
    to the end of that token. Two things are wrong with feeding it every token:
    - the search is over the whole output so far, at every token: ~50 us more per token for every 1000
      tokens of output (measured), quadratic, on the engine thread that all sequences share;
    - if the grammar refuses the text after the trigger, llama.cpp throws a C++ exception through its C
      API, and the process aborts.
    So the triggers are looked for here, in the last bytes of the output only (a match that is new at
    this token ends inside it), with the same rules: literal patterns, tried in order, leftmost match,
    on the same special-token pieces. Before a token that completes a trigger is accepted, the text it
    would feed is checked on a clone of the grammar in its start state (one token at a time, with apply,
    which never throws); a token the grammar would refuse is masked and the token picked again. Only
    then does the llama.cpp grammar see any output: the few tokens that hold the trigger, so that its
    own match, at the same place, switches it on and feeds it the same text."""

    def __init__(self, grammar, chain, n_vocab: int, *, probe, triggers: list[str], tokenizer) -> None:
        super().__init__(grammar, chain, n_vocab)
        self.probe = probe  # the same grammar, not lazy, never advanced: cloned for every check
        self.triggers = [encode_text(t) for t in triggers]
        self.reach = max(len(t) for t in self.triggers) - 1  # how far back a new match can start
        self.tokenizer = tokenizer
        self.pieces = tokenizer.special_pieces()
        self.tail = b""  # the last `reach` bytes of the output
        self.recent: collections.deque[int] = collections.deque()  # the tokens that hold `tail`
        self.recent_bytes = 0
        self.waiting = True

    def accepts(self, text: bytes) -> bool:
        """Whether the grammar, from its start, accepts `text` as (a prefix of) its language."""
        ids = self.tokenizer.spell(text)
        if ids is None:
            return False
        clone = llama_cpp.llama_sampler_clone(self.probe)
        try:
            for tok in ids:
                if not self._allowed(tok, clone):
                    return False
                llama_cpp.llama_sampler_accept(clone, tok)
            return True
        finally:
            llama_cpp.llama_sampler_free(clone)

    def _trigger_text(self, token: int) -> bytes | None:
        """The text the grammar would be fed if `token` were accepted now, or None when it would keep
        waiting."""
        window = self.tail + self.pieces[token]
        for trigger in self.triggers:
            at = window.find(trigger)
            if at >= 0:
                return window[at:]
        return None

    def _remember(self, token: int) -> None:
        piece = self.pieces[token]
        self.recent.append(token)
        self.recent_bytes += len(piece)
        while self.recent and self.recent_bytes - len(self.pieces[self.recent[0]]) >= self.reach:
            self.recent_bytes -= len(self.pieces[self.recent.popleft()])
        self.tail = (self.tail + piece)[-self.reach:] if self.reach else b""

    def sample(self, ctx, batch_index: int) -> int:
        if not self.waiting:
            return super().sample(ctx, batch_index)
        logits = self.rows.row(ctx, batch_index)
        refused: list[int] = []
        while True:  # ends: a token that completes no trigger is always left
            token = self._pick(logits, constrained=False, exclude=refused)
            fed = self._trigger_text(token)
            if fed is None or self.accepts(fed):
                break
            refused.append(token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        if fed is None:
            self._remember(token)
        else:
            for tok in self.recent:
                llama_cpp.llama_sampler_accept(self.grammar, tok)
            llama_cpp.llama_sampler_accept(self.grammar, token)
            self.waiting = False
            self.recent.clear()
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
        if params.grammar_triggers:
            owned.append(lazy_grammar_sampler(vocab, params.grammar, params.grammar_triggers, params.grammar_param))
        unconstrained = dataclasses.replace(params, grammar=None, grammar_triggers=None)
        owned.append(build_chain(unconstrained, n_vocab=n_vocab, n_ctx_seq=n_ctx_seq, default_seed=default_seed,
                                 banned_tokens=banned_tokens, vocab=vocab, history=history))
        if not params.grammar_triggers:
            grammar, chain = owned
            return GrammarSampler(grammar, chain, n_vocab)
        probe, grammar, chain = owned
        sampler = LazyGrammarSampler(grammar, chain, n_vocab, probe=probe, triggers=params.grammar_triggers,
                                     tokenizer=tokenizer)
    except BaseException:
        for smpl in owned:
            llama_cpp.llama_sampler_free(smpl)
        raise
    # A grammar that does not start with its trigger could never be switched on: say so now.
    for trigger in params.grammar_triggers:
        if not sampler.accepts(encode_text(trigger)):
            sampler.free()
            raise InvalidParameter(f"the grammar must match from its trigger on, and it refuses {trigger!r:.80}",
                                   param=params.grammar_param)
    return sampler


def grammar_sampler(vocab, grammar: str, param: str = "response_format"):
    """A llama.cpp grammar sampler, or InvalidParameter (naming `param`) when llama.cpp cannot parse the
    grammar."""
    smpl = llama_cpp.llama_sampler_init_grammar(vocab, encode_text(grammar), b"root")
    if not smpl:
        raise InvalidParameter("the grammar could not be parsed", param=param)
    return smpl


def lazy_grammar_sampler(vocab, grammar: str, triggers: list[str], param: str = "response_format"):
    """A lazy llama.cpp grammar sampler that waits for one of the literal `triggers` (see
    LazyGrammarSampler before using it outside one: accepting a token it refuses aborts the process)."""
    patterns = [trigger_pattern(t) for t in triggers]
    array = (ctypes.c_char_p * len(patterns))(*patterns)
    smpl = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, encode_text(grammar), b"root", array, len(patterns), None, 0)
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
