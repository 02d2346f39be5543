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

Drafting costs nothing when no n-gram matches; a wrong draft costs its extra batch positions. How long
a draft from the sequence's own history is follows from how long its match is (MatchOdds): on a copying
reply a match that goes back 16 tokens or more almost always goes on for many tokens, while a 2-token
match is a guess. Each sequence learns the chance that a drafted token is right for each match length,
and drafts the length with the most tokens per second of verifying, on the measured cost of a step by
its size; pool drafts keep odds of their own.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Callable, Iterable, Iterator

NGRAM_SIZES = (4, 3, 2)  # n-gram lengths looked up, longest first: a longer match is a better guess

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


def _flat(n: int) -> float:
    """Step costs when none are measured (tests): every size costs the same, so a draft is as long as allowed."""
    return 0.01


# Own-history drafts: the chance that a drafted token is right, by the length of the match it continues
# (counted back to at most MAX_CONTEXT tokens), in these buckets. Replaying 8 edit-task replies of
# Qwen2.5-Coder-0.5B: after a match of 2-3 tokens 6-8 drafted tokens in a row were right on average,
# after 16-31 tokens 26, and 93% of those drafts had 16 or more right; a story (nothing to copy) has short
# matches that are right much less often.
MATCH_BUCKETS = (2, 4, 8, 16, 32)
MAX_CONTEXT = 64
# Before a sequence's own drafts are counted: 3.5 right of 4 tried in each bucket. Optimistic enough that
# a new sequence drafts at all, light enough that a few misses stop it (the prior was chosen on the
# replayed edit and story replies: lower ones never start drafting, higher ones keep wrong drafts long).
PRIOR_RIGHT = 3.5
PRIOR_TRIED = 4.0
# How far a sequence that drafts nothing this step checks what its own history would have drafted
# (NgramDrafter.watch): long enough to judge a long match's run, short enough to be judged soon.
WATCH_LEN = 16


def _bucket(context: int) -> int:
    return max(0, bisect.bisect_right(MATCH_BUCKETS, context) - 1)


class MatchOdds:
    """One sequence's record of one source's drafts: for each match-length bucket, how many drafted
    tokens were tried and how many were right. A drafted token at position j of a draft that continues a
    match of c tokens is itself predicted by a match of c + j - 1 tokens, so a long copy's later tokens
    count towards the long buckets. A draft of k tokens yields 1 + p1 + p1*p2 + ... tokens (the next token,
    then each drafted one while all before it were right), and the length chosen is the one with the most
    tokens per second of the step that verifies it, if that beats a plain step by MIN_GAIN: so a sequence
    whose short matches guess wrong stops drafting on them, and still drafts on long ones."""

    def __init__(self) -> None:
        self.right = [PRIOR_RIGHT] * len(MATCH_BUCKETS)
        self.tried = [PRIOR_TRIED] * len(MATCH_BUCKETS)

    def chance(self, context: int) -> float:
        b = _bucket(context)
        return self.right[b] / self.tried[b]

    def length(self, context: int, limit: int, step_seconds: Callable[[int], float], base: int) -> int:
        """The best draft length of at most `limit` tokens for a match of `context` tokens (best_length)."""
        return best_length(self._expected(context, limit), step_seconds, base)

    def _expected(self, context: int, limit: int) -> Iterator[float]:
        """The tokens a step yields with a draft of 1, 2, ... `limit` tokens."""
        expected = survive = 1.0
        for k in range(1, limit + 1):
            survive *= self.chance(context + k - 1)
            expected += survive
            yield expected

    def update(self, context: int, drafted: int, accepted: int) -> None:
        """Positions after the first wrong one were never judged: only those up to it count."""
        for j in range(min(drafted, accepted + 1)):
            b = _bucket(context + j)
            self.tried[b] += 1
            if j < accepted:
                self.right[b] += 1


class NgramDrafter:
    """One sequence's history (prompt + output) indexed by its n-grams, the engine's pool of earlier
    sequences' n-grams, and the odds of each (MatchOdds), which set the draft's length.

    Built with the prompt in Engine.prepare (on the caller's thread: indexing a long prompt takes
    milliseconds); the engine thread pushes each generated token and asks for drafts."""

    def __init__(self, prompt: list[int], pool: NgramPool | None = None, ends: frozenset[int] = frozenset()) -> None:
        self.history: list[int] = []
        # A draft not made (watch): its tokens, how many of them came true so far, its match's length.
        self._watched: list[int] = []
        self._watched_right = 0
        self._watched_context = 0
        # Tokens that end generation (a chat template's end of turn): a draft stops before one, since a
        # reply that ends there reads nothing after it, and one that goes on never chose it. A copied
        # file's end in the prompt is followed by the end of the user's turn; a 48-token draft across it
        # was verified in full at the end of every edit reply.
        self.ends = ends
        # per n-gram size: the n tokens -> index in history of the token that followed their most recent
        # occurrence. An n-gram enters once the token after it is known, so the current last n tokens
        # are always looked up among earlier occurrences only.
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in NGRAM_SIZES]
        for tok in prompt:
            self.push(tok)
        self.pool = pool
        # Each source keeps its own odds, so a sequence whose pool guesses fail still drafts from its own
        # history. A pool draft continues a match of the pool's key length.
        self.own = MatchOdds()
        self.pooled = MatchOdds()
        self._last = self.own  # the source of the draft being verified
        self._drafted_context = 0  # the match length that draft continued

    def push(self, tok: int) -> None:
        if self._watched:
            if tok != self._watched[self._watched_right]:
                self._judge_watched()
            else:
                self._watched_right += 1
                if self._watched_right == len(self._watched):
                    self._judge_watched(right_to_the_end=True)
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

    def draft(self, limit: int, step_seconds: Callable[[int], float] = _flat, base: int = 1) -> list[int]:
        """This step's draft: at most `limit` tokens (the scheduler's cap), as long as pays on
        step_seconds(n), the cost of a step of n batch positions of which `base` are there anyway.

        The sequence's own history is the better guess (it is this text). The pool drafts where it has
        no match, and where its match is shorter than the pool's POOL_NGRAM-token key while the pool's
        drafts have fared at least as well: a request repeating an earlier reply."""
        match = self._match()
        context = self._context(*match, MAX_CONTEXT) if match is not None else 0
        pool = self.pool
        if pool is not None and (match is None or (context < pool.n
                                                   and self.pooled.chance(pool.n) >= self.own.chance(context))):
            draft = self._until_end(pool.lookup(self.history, limit))
            k = self.pooled.length(pool.n, len(draft), step_seconds, base) if draft else 0
            if k > 0:
                self._drafting(self.pooled, pool.n)
                return draft[:k]
        if match is None:
            return []
        draft = self._until_end(self._copy(match[0], limit))
        k = self.own.length(context, len(draft), step_seconds, base)
        if k > 0:
            self._drafting(self.own, context)
        return draft[:k]

    def _drafting(self, odds: MatchOdds, context: int) -> None:
        if self._watched:  # a real draft takes over: what the watched one got right so far counts
            self._judge_watched(right_to_the_end=True)
        self._last, self._drafted_context = odds, context

    def _until_end(self, draft: list[int]) -> list[int]:
        for i, tok in enumerate(draft):
            if tok in self.ends:
                return draft[:i]
        return draft

    def watch(self) -> None:
        """This step drafts nothing for the sequence (a full batch, or odds too low to pay): note what
        its own history would have drafted, and judge it on the tokens that come, as a verified draft
        is judged. So a sequence learns its odds while the batch is too busy to draft (a busy server's
        last sequences draft on their own record, not on the prior), and a match length whose drafts
        stopped paying is drafted again once its guesses come true again."""
        if self._watched:
            return
        match = self._match()
        if match is None:
            return
        self._watched = self._until_end(self._copy(match[0], WATCH_LEN))
        self._watched_right = 0
        self._watched_context = self._context(*match, MAX_CONTEXT)

    def _judge_watched(self, right_to_the_end: bool = False) -> None:
        """Count the watched draft: wrong at _watched_right, or right as far as it came."""
        right = self._watched_right
        self.own.update(self._watched_context, right if right_to_the_end else len(self._watched), right)
        self._watched = []

    @property
    def from_pool(self) -> bool:
        """The draft being verified came from the pool."""
        return self._last is self.pooled

    def update(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them were the model's choice."""
        self._last.update(self._drafted_context, drafted, accepted)


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


def best_length(expected: Iterable[float], step_seconds: Callable[[int], float], base: int,
                pass_seconds: float = 0.0) -> int:
    """The draft length with the most tokens per second, 0 when none beats plain decoding by MIN_GAIN.
    expected: the tokens the sequence gets from a step with a draft of 1, 2, ... tokens; step_seconds(n):
    what a target step of n batch positions costs; `base` positions are in it anyway (one per generating
    sequence, each yielding a token: a draft slows them all); pass_seconds: what drafting one token costs."""
    best, best_rate = 0, MIN_GAIN * base / step_seconds(base)
    for k, tokens in enumerate(expected, 1):
        rate = (base - 1 + tokens) / (step_seconds(base + k) + k * pass_seconds)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def best_draft_len(acceptance: float, step_seconds: Callable[[int], float], pass_seconds: float,
                   base: int, k_max: int) -> int:
    """best_length for a draft model's draft, whose every token is right with the same chance."""
    return best_length((expected_tokens(acceptance, k) for k in range(1, k_max + 1)), step_seconds, base,
                       pass_seconds)


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
    busy spell must not price a lone sequence's drafts.

    A size not yet measured is guessed on the line between the nearest measured sizes around it; past
    the largest measured one, each further position adds what one added between the smallest and the
    largest measured, at most EXTRA_POSITION of the smallest step (a draft size is then tried when it
    would pay at that cost, and judged on its own measured cost after that). A guess of no extra cost
    made a fresh engine's first long drafts on a CPU try every size at full price: 49 positions of the
    0.5B model cost 493 ms against 32 ms for one. A table with one measured size takes that slope from
    the nearest table with two or more; a table with none measured is priced as the nearest measured
    one: the first steps of a busy server's last sequence used to see every size at one price and
    drafted 48 tokens."""

    SIZES = 64
    SEQUENCES = 4
    # An extra batch position costs at most this share of the smallest measured step, until measured: on
    # 2 CPU cores 16 positions of the 0.5B model cost 6.4x one (scripts/bench_verify.py); a GPU's steps
    # grow far less with their size, and its measured sizes then set a lower slope.
    EXTRA_POSITION = 0.35
    SMOOTHING = 0.1

    def __init__(self) -> None:
        self.tables: list[list[float | None]] = [[None] * (self.SIZES + 1) for _ in range(self.SEQUENCES + 1)]
        # Each table's costs for every size, measured or guessed; rebuilt after a record (a draft
        # decision reads up to 48 sizes, each step).
        self._curves: list[list[float] | None] = [None] * (self.SEQUENCES + 1)

    def record(self, n: int, seconds: float, sequences: int = 1) -> None:
        which = min(max(sequences, 1), self.SEQUENCES)
        table = self.tables[which]
        if 0 < n <= self.SIZES:
            old = table[n]
            if old is None:
                table[n] = seconds
            else:
                # One step preempted by another process must not reprice every draft: a sample moves
                # the estimate as if it were at most twice (or half) the estimate.
                sample = min(max(seconds, old / 2), old * 2)
                table[n] = old + self.SMOOTHING * (sample - old)
            self._curves = [None] * (self.SEQUENCES + 1)  # other tables may borrow from this one

    def view(self, sequences: int) -> Callable[[int], float]:
        """step_seconds(n) for steps with this many generating sequences."""
        curve = self._cached(min(max(sequences, 1), self.SEQUENCES))
        last = self.SIZES

        def seconds(n: int) -> float:
            return curve[min(n, last)]

        return seconds

    def _cached(self, which: int) -> list[float]:
        curve = self._curves[which]
        if curve is None:
            curve = self._curves[which] = self._curve(which)
        return curve

    def _measured(self, which: int) -> list[int]:
        table = self.tables[which]
        return [m for m in range(1, self.SIZES + 1) if table[m] is not None]

    def _curve(self, which: int) -> list[float]:
        table = self.tables[which]
        measured = self._measured(which)
        # The other tables, nearest first, of two as near the one with fewer sequences.
        others = sorted((o for o in range(1, self.SEQUENCES + 1) if o != which),
                        key=lambda o: (abs(o - which), o > which))
        if not measured:
            for other in others:
                if self._measured(other):
                    return self._cached(other)
            return [0.01] * (self.SIZES + 1)  # nothing measured anywhere: every size alike
        curve = [0.01] * (self.SIZES + 1)  # below the smallest measured size (never priced): a token cost
        for low, high in itertools.pairwise(measured):
            for n in range(low, high):
                curve[n] = table[low] + (table[high] - table[low]) * (n - low) / (high - low)
        first, last = measured[0], measured[-1]
        cap = self.EXTRA_POSITION * table[first]
        slope = self._slope(which)
        if slope is None:
            slope = next((s for s in map(self._slope, others) if s is not None), cap)
        slope = max(0.0, min(slope, cap))
        for n in range(last, self.SIZES + 1):
            curve[n] = table[last] + slope * (n - last)
        return curve

    def _slope(self, which: int) -> float | None:
        """What one more position added between the smallest and the largest measured size."""
        measured = self._measured(which)
        if len(measured) < 2:
            return None
        table, first, last = self.tables[which], measured[0], measured[-1]
        return (table[last] - table[first]) / (last - first)

    def __call__(self, n: int) -> float:
        return self.view(1)(n)
