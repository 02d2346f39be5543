"""N-gram (prompt lookup) drafts for greedy sequences, and how long a draft each sequence gets.

A sequence whose output copies its context (a code edit that prints the file again, an extraction, a
quote) can guess its next tokens by looking its last few tokens up in its own prompt and output: the
tokens that followed their most recent earlier occurrence are the draft. The scheduler decodes the draft
with the sequence's next token in the step's one batch, with logits at every position, and keeps the
drafted tokens the model's greedy choice agrees with (scheduler.py, _verify). Greedy output is the same
token for token with or without drafts; only greedy requests (ArgmaxSampler) draft at all.

A request like an earlier one (the same question again, a file edited again) can also draft what the
earlier reply said: the engine keeps a bounded pool of the n-grams of its finished greedy sequences
(NgramPool), consulted where the sequence's own history has no long match.

Drafting costs nothing when no n-gram matches; a wrong draft costs its extra batch positions. So each
sequence's draft length follows its measured acceptance, separately for its own history and the pool
(DraftLength): it doubles on a fully accepted draft, shrinks to what was accepted (plus one) on a
partial one, and after drafts of which nothing was accepted that source is not asked for a growing
number of steps.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

NGRAM_SIZES = (4, 3, 2)  # n-gram lengths looked up, longest first: a longer match is a better guess
MIN_DRAFT = 2
START_DRAFT = 4
MAX_DRAFT = 16
MAX_PAUSE = 32  # the most steps a sequence goes without drafting after misses

# The pool of n-grams from earlier requests (NgramPool). Its key is long: structure shared by different
# texts (the same code layout with other names) matches short n-grams and then guesses wrong, while a
# run of POOL_NGRAM tokens seen before usually goes on as it did. On the edit benchmark's outputs a
# 12-token key beat 4 and 8 (docs/speculation.md, the pool).
POOL_NGRAM = 12
POOL_ENTRIES = 1 << 17  # ~10 MB of dicts: the n-grams of the last ~100k tokens learned
POOL_CHUNK = 512  # tokens indexed per engine step: ~0.2 ms, so a long finished sequence never stalls one


class NgramPool:
    """N-grams of an engine's finished greedy sequences (prompt and output), for the drafts of later ones:
    a request like an earlier one (the same question again, a file edited again, boilerplate every reply
    repeats) can draft the earlier reply, which its own history does not hold.

    Each n-gram maps to the token that followed it last time; a draft follows the chain from the
    sequence's last POOL_NGRAM tokens, one token at a time, until an n-gram is unknown. Keys are the
    n-grams' hashes (a collision only costs a rejected draft). Memory is bounded by two generations of
    dicts: new and refreshed n-grams go into the young one; when it is full the old one is dropped whole
    and the young one takes its place, so eviction costs nothing per token and what is still in use
    survives. Engine thread only."""

    def __init__(self, n: int = POOL_NGRAM, entries: int = POOL_ENTRIES) -> None:
        self.n = n
        self.generation = max(1, entries // 2)
        self.young: dict[int, int] = {}
        self.old: dict[int, int] = {}
        self._todo: collections.deque[list[int]] = collections.deque()
        self._at = n  # the next position of _todo[0] to learn

    def learn(self, tokens: list[int]) -> None:
        """Queue a finished sequence's tokens (the list is kept, not copied: its owner is done with it)."""
        if len(tokens) > self.n:
            self._todo.append(tokens)

    @property
    def pending(self) -> bool:
        return bool(self._todo)

    def index(self, budget: int = POOL_CHUNK) -> None:
        """Learn up to `budget` queued tokens: a long sequence is spread over several steps."""
        n = self.n
        while self._todo and budget > 0:
            tokens = self._todo[0]
            start = self._at
            end = min(len(tokens), start + budget)
            young = self.young
            for i in range(start, end):
                young[hash(tuple(tokens[i - n:i]))] = tokens[i]
                if len(young) >= self.generation:
                    self.old = young
                    self.young = young = {}
            budget -= end - start
            if end == len(tokens):
                self._todo.popleft()
                self._at = n
            else:
                self._at = end

    def lookup(self, history: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the last n tokens of `history`, and then the draft's own
        last n tokens, in earlier sequences; [] when the first n-gram is unknown."""
        n = self.n
        if len(history) < n or limit <= 0:
            return []
        young, old = self.young, self.old
        context = history[-n:]
        draft: list[int] = []
        while len(draft) < limit:
            key = hash(tuple(context[-n:]))
            tok = young.get(key)
            if tok is None:
                tok = old.get(key)
                if tok is None:
                    break
            draft.append(tok)
            context.append(tok)
        return draft

    def clear(self) -> None:
        self.young, self.old = {}, {}
        self._todo.clear()
        self._at = self.n


class DraftLength:
    """How long a draft one source of drafts gets for one sequence, from how its drafts fared: it
    doubles on a fully accepted draft, shrinks to what was accepted (plus one) on a partial one, and
    after drafts of which nothing was accepted the source is not asked for a growing number of steps.
    Each source keeps its own, so a sequence whose pool guesses fail still drafts from its own history."""

    def __init__(self) -> None:
        self.max_len = START_DRAFT
        self.misses = 0  # drafts in a row of which nothing was accepted
        self.pause = 0  # steps left without drafting
        # The price of verifying: where extra batch positions are dear (one thread, a big model on a CPU)
        # a draft must be expected to pay for them, as a draft model's must (best_draft_len).
        self.price = DraftState()

    def ready(self) -> bool:
        """False while paused; each call counts one step of the pause."""
        if self.pause:
            self.pause -= 1
            return False
        return True

    def update(self, drafted: int, accepted: int) -> None:
        self.price.update(drafted, accepted)
        if accepted == drafted:
            self.misses = 0
            self.max_len = min(MAX_DRAFT, self.max_len * 2)
        elif accepted:
            self.misses = 0
            self.max_len = max(MIN_DRAFT, accepted + 1)
        else:
            self.misses += 1
            self.max_len = MIN_DRAFT
            self.pause = min(MAX_PAUSE, (1 << self.misses) - 1 if self.misses > 1 else 0)


def _free(price: DraftState, k: int) -> int:
    return k


class NgramDrafter:
    """One sequence's history (prompt + output) indexed by its n-grams, the engine's pool of earlier
    sequences' n-grams, and an adaptive draft length for each.

    Built with the prompt in Engine.prepare (on the caller's thread: indexing a long prompt takes
    milliseconds); the engine thread pushes each generated token and asks for drafts."""

    def __init__(self, prompt: list[int], pool: NgramPool | None = None) -> None:
        self.history: list[int] = []
        # per n-gram size: the n tokens -> index in history of the token that followed their most recent
        # occurrence. An n-gram enters once the token after it is known, so the current last n tokens
        # are always looked up among earlier occurrences only.
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in NGRAM_SIZES]
        for tok in prompt:
            self.push(tok)
        self.pool = pool
        self.own = DraftLength()
        self.pooled = DraftLength()
        self._last = self.own  # the source of the draft being verified

    def push(self, tok: int) -> None:
        h = self.history
        i = len(h)  # the index `tok` takes: it follows the n-grams that end at i - 1
        for n, index in zip(NGRAM_SIZES, self.index, strict=True):
            if i >= n:
                index[tuple(h[i - n:i])] = i
        h.append(tok)

    def _match(self) -> tuple[int, int] | None:
        """(index of the token after the most recent earlier occurrence of the longest n-gram ending the
        history, n), or None."""
        h = self.history
        size = len(h)
        for n, index in zip(NGRAM_SIZES, self.index, strict=True):
            if size >= n:
                at = index.get(tuple(h[size - n:]))
                if at is not None:
                    return at, n
        return None

    def _context(self, at: int, n: int, most: int) -> int:
        """How many tokens (up to `most`) before `at` equal the ones ending the history: how long the
        own match really is."""
        h = self.history
        size = len(h)
        while n < most and at - 1 - n >= 0 and h[at - 1 - n] == h[size - 1 - n]:
            n += 1
        return n

    def _copy(self, at: int, limit: int) -> list[int]:
        h = self.history
        period = len(h) - at
        draft = h[at:at + limit]
        # A match close to the end runs into the draft itself: the text repeats with the period
        # size - at (a list, a table row, a repeated phrase), so the draft continues it.
        while len(draft) < limit:
            draft.append(draft[len(draft) - period])
        return draft

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the most recent earlier occurrence of the longest n-gram
        ending the history; [] when none matches."""
        match = self._match()
        return self._copy(match[0], limit) if match is not None else []

    def draft(self, limit: int, priced: Callable[[DraftState, int], int] = _free) -> list[int]:
        """This step's draft: at most `limit` tokens (the scheduler's cap), the source's own length, and
        what `priced(price, k)` says is worth verifying of k tokens.

        The sequence's own history is the better guess (it is this text). The pool drafts where it has
        no match, and where its match is shorter than the pool's POOL_NGRAM-token run while the pool's
        drafts have fared at least as well as its own: a request repeating an earlier reply."""
        own_ready = self.own.ready()
        pool_ready = self.pool is not None and self.pooled.ready()
        match = self._match() if own_ready else None
        if pool_ready and (match is None or (self.pooled.price.acceptance >= self.own.price.acceptance
                                             and self._context(*match, self.pool.n) < self.pool.n)):
            draft = self.pool.lookup(self.history, min(limit, self.pooled.max_len))
            if draft:
                self._last = self.pooled
                return draft[:priced(self.pooled.price, len(draft))]
        if match is None:
            return []
        self._last = self.own
        k = priced(self.own.price, min(limit, self.own.max_len))
        return self._copy(match[0], k) if k > 0 else []

    @property
    def from_pool(self) -> bool:
        """The draft being verified came from the pool."""
        return self._last is self.pooled

    def update(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them were the model's choice."""
        self._last.update(drafted, accepted)


# Draft-model speculation: a draft costs a pass of the draft model per token, so its length is chosen
# by what it is expected to buy. With acceptance rate a (the chance that the target agrees with one more
# drafted token), a draft of k tokens yields 1 + a + ... + a^k tokens per step, at the price of a
# verify step with k more positions plus k draft passes; without a draft, one token per plain step.

PRIOR_ACCEPTANCE = 0.6  # a new sequence's acceptance rate until its own drafts are counted
ACCEPTANCE_MEMORY = 0.9  # how much of a sequence's acceptance estimate each verified token keeps
MIN_GAIN = 1.05  # a draft must be expected to beat plain decoding by this factor
PROBE_EVERY = 16  # steps a sequence goes without drafting before it tries a short draft again...
MAX_PROBE_EVERY = 256  # ...doubling after each probe that was refused, up to this
PROBE_LEN = 2


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step yields with a k-token draft: the next token, then each drafted one while accepted."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def best_draft_len(acceptance: float, step_seconds: Callable[[int], float], pass_seconds: float,
                   base: int, k_max: int) -> int:
    """The draft length with the most tokens per second, 0 when none beats plain decoding by MIN_GAIN.
    step_seconds(n): what a target step of n batch positions costs; `base` positions are in it anyway."""
    plain = 1.0 / step_seconds(base)
    best, best_rate = 0, plain * MIN_GAIN
    for k in range(1, k_max + 1):
        rate = expected_tokens(acceptance, k) / (step_seconds(base + k) + k * pass_seconds)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


class DraftState:
    """A sequence's measured acceptance, for draft-model speculation. Once its acceptance is too low for
    drafts to pay, it drafts nothing, except a short probe now and then (ever more rarely while probes
    fail), so that a sequence that starts copying is noticed."""

    def __init__(self) -> None:
        self.acceptance = PRIOR_ACCEPTANCE
        self.idle = 0  # steps since it last drafted
        self.probe_every = PROBE_EVERY

    def draft_len(self, step_seconds: Callable[[int], float], pass_seconds: float, base: int, k_max: int) -> int:
        k = best_draft_len(self.acceptance, step_seconds, pass_seconds, base, k_max)
        if k:
            return k
        self.idle += 1
        if self.idle < self.probe_every:
            return 0
        # Probe only where drafts could pay at all: with near-certain acceptance.
        return min(PROBE_LEN, k_max) if best_draft_len(0.95, step_seconds, pass_seconds, base, k_max) else 0

    def push(self, tok: int) -> None:  # the n-gram drafter's interface: nothing to index here
        pass

    def update(self, drafted: int, accepted: int) -> None:
        # Each agreed token is a success; the first disagreement, if any, one failure.
        a = self.acceptance
        for _ in range(accepted):
            a = ACCEPTANCE_MEMORY * a + (1 - ACCEPTANCE_MEMORY)
        if accepted < drafted:
            a = ACCEPTANCE_MEMORY * a
        if self.idle >= self.probe_every:  # this was a probe
            self.probe_every = PROBE_EVERY if accepted == drafted else min(MAX_PROBE_EVERY, self.probe_every * 2)
        self.acceptance = a
        self.idle = 0


class StepCosts:
    """What a plain generation step costs by its number of batch positions, measured (an EWMA per size),
    separately for each number of generating sequences (1, 2, 3, 4 and more): with a KV stream per
    sequence, 8 positions of 8 sequences cost more than 8 positions of one sequence and its draft, so a
    busy spell must not price a lone sequence's drafts. Sizes not yet measured are guessed from the
    nearest smaller measured one, optimistically: so a draft length is tried once and then judged on its
    measured cost."""

    SIZES = 64
    SEQUENCES = 4
    SMOOTHING = 0.1

    def __init__(self) -> None:
        self.tables: list[list[float | None]] = [[None] * (self.SIZES + 1) for _ in range(self.SEQUENCES + 1)]

    def record(self, n: int, seconds: float, sequences: int = 1) -> None:
        table = self.tables[min(max(sequences, 1), self.SEQUENCES)]
        if 0 < n <= self.SIZES:
            old = table[n]
            if old is None:
                table[n] = seconds
            else:
                # One step preempted by another process must not reprice every draft: a sample moves
                # the estimate as if it were at most twice (or half) the estimate.
                sample = min(max(seconds, old / 2), old * 2)
                table[n] = old + self.SMOOTHING * (sample - old)

    def view(self, sequences: int) -> Callable[[int], float]:
        """step_seconds(n) for steps with this many generating sequences."""
        table = self.tables[min(max(sequences, 1), self.SEQUENCES)]

        def seconds(n: int) -> float:
            for m in range(min(n, self.SIZES), 0, -1):
                if table[m] is not None:
                    return table[m]
            return 0.01

        return seconds

    def __call__(self, n: int) -> float:
        return self.view(1)(n)
