"""What goes into the engine (a request) and what comes out (a stream of events)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ggufchat.engine.sampling import SamplingParams

_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """One sequence to generate. `prompt_tokens` is already tokenized (see Engine.tokenize_chat)."""

    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # None: until end-of-generation or the sequence's context is full. 0: decode the prompt only (for
    # prompt_logprobs) and finish with reason "length", no token sampled.
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: keep generating through end-of-generation tokens
    # The logprob of each generated token and this many top alternatives (0..20); None: none computed.
    logprobs: int | None = None
    # The logprob of each prompt token given the ones before it, with this many top alternatives (0..20),
    # as lm-evaluation-harness's loglikelihood needs; delivered on one Delta before any generated token.
    # Such a request decodes its whole prompt: a cached prefix has KV but no logits to read.
    prompt_logprobs: int | None = None
    # False: never speculate for this request (the server's "speculative": false). Only greedy requests
    # (temperature 0, no grammar, no penalties) speculate at all, and only with the engine's --spec ngram.
    speculative: bool = True
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request
    completion_tokens: int = 0
    drafted_tokens: int = 0  # speculation: tokens drafted for this sequence and verified
    accepted_tokens: int = 0  # of those, the ones the model agreed with (each saved a decode step)
    t_submit: float = 0.0  # time.perf_counter() values
    t_start: float = 0.0  # taken off the queue into a slot
    t_first_token: float = 0.0
    t_end: float = 0.0

    @property
    def time_to_first_token(self) -> float:
        return max(0.0, self.t_first_token - self.t_submit) if self.t_first_token else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        span = self.t_end - self.t_first_token
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits: before temperature,
    penalties, grammar or banned tokens, as OpenAI reports them) and the `top` most likely tokens at
    that position as (id, logprob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of a sequence, and the ids of the tokens that produced it.

    `logprobs` (requests that ask for them): one entry per id in `token_ids`, in the same order.
    `prompt_logprobs` (requests that ask for them): one entry per prompt token, None for the first (it has
    no context); sent once, on a Delta with no text and no tokens, before any generated token."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Finish:
    """The last event of every sequence. reason: stop, length, cancelled or error."""

    reason: str
    usage: Usage
    error: BaseException | None = None
    eog_token: int | None = None  # the end-of-generation token that ended it, if one did (never emitted as text)


Event = Delta | Finish


@dataclass(frozen=True)
class EngineStats:
    """The engine's load and work so far, read without stopping it (each field may be one step older
    than another): what /health and the metrics gauges show."""

    active_sequences: int = 0  # sequences in a slot: prefilling or generating
    queue_depth: int = 0  # sequences waiting for a free slot
    steps: int = 0  # batches decoded since the model was loaded
    decode_seconds: float = 0.0  # time inside llama_decode since the model was loaded
    drafted_tokens: int = 0  # speculation: tokens drafted and verified since the model was loaded
    accepted_tokens: int = 0  # of those, the ones the model agreed with


@dataclass(frozen=True)
class Vocabulary:
    """What a caller that builds prompts out of token ids needs to know of the model's vocabulary."""

    n_vocab: int
    bos: int | None  # None: the model has no beginning-of-sequence token
    eos: int | None
    add_bos: bool  # the model expects every prompt to start with BOS

    @property
    def prompt_start(self) -> list[int]:
        """The ids every prompt begins with: [BOS] when the model wants it, else []."""
        return [self.bos] if self.add_bos and self.bos is not None else []
