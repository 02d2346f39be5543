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
    max_tokens: int | None = None  # None: until end-of-generation or the sequence's context is full
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: keep generating through end-of-generation tokens
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request
    completion_tokens: int = 0
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
class Delta:
    """New text of a sequence, and the ids of the tokens that produced it."""

    text: str
    token_ids: list[int]


@dataclass
class Finish:
    """The last event of every sequence. reason: stop, length, cancelled or error."""

    reason: str
    usage: Usage
    error: BaseException | None = None
    eog_token: int | None = None  # the end-of-generation token that ended it, if one did (never emitted as text)


Event = Delta | Finish
