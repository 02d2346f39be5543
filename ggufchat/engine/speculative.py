"""N-gram (prompt lookup) drafts for greedy sequences, and how long a draft each sequence gets.

A sequence whose output copies its context (a code edit that prints the file again, an extraction, a
quote) can guess its next tokens by looking its last few tokens up in its own prompt and output: the
tokens that followed their most recent earlier occurrence are the draft. The scheduler decodes the draft
with the sequence's next token in the step's one batch, with logits at every position, and keeps the
drafted tokens the model's greedy choice agrees with (scheduler.py, _verify). Greedy output is the same
token for token with or without drafts; only greedy requests (ArgmaxSampler) draft at all.

Drafting costs nothing when no n-gram matches; a wrong draft costs its extra batch positions. So each
sequence's draft length follows its measured acceptance: it doubles on a fully accepted draft, shrinks
to what was accepted (plus one) on a partial one, and after drafts of which nothing was accepted the
sequence stops drafting for a growing number of steps.
"""

from __future__ import annotations

NGRAM_SIZES = (4, 3, 2)  # n-gram lengths looked up, longest first: a longer match is a better guess
MIN_DRAFT = 2
START_DRAFT = 4
MAX_DRAFT = 16
MAX_PAUSE = 32  # the most steps a sequence goes without drafting after misses


class NgramDrafter:
    """One sequence's history (prompt + output) indexed by its n-grams, and its adaptive draft length.

    Built with the prompt in Engine.prepare (on the caller's thread: indexing a long prompt takes
    milliseconds); the engine thread pushes each generated token and asks for drafts."""

    def __init__(self, prompt: list[int]) -> None:
        self.history: list[int] = []
        # per n-gram size: the n tokens -> index in history of the token that followed their most recent
        # occurrence. An n-gram enters once the token after it is known, so the current last n tokens
        # are always looked up among earlier occurrences only.
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in NGRAM_SIZES]
        for tok in prompt:
            self.push(tok)
        self.max_len = START_DRAFT
        self.misses = 0  # drafts in a row of which nothing was accepted
        self.pause = 0  # steps left without drafting

    def push(self, tok: int) -> None:
        h = self.history
        i = len(h)  # the index `tok` takes: it follows the n-grams that end at i - 1
        for n, index in zip(NGRAM_SIZES, self.index, strict=True):
            if i >= n:
                index[tuple(h[i - n:i])] = i
        h.append(tok)

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the most recent earlier occurrence of the longest n-gram
        ending the history; [] when none matches."""
        h = self.history
        size = len(h)
        for n, index in zip(NGRAM_SIZES, self.index, strict=True):
            if size < n:
                continue
            at = index.get(tuple(h[size - n:]))
            if at is not None:
                draft = h[at:at + limit]
                # A match close to the end runs into the draft itself: the text repeats with the period
                # size - at (a list, a table row, a repeated phrase), so the draft continues it.
                while len(draft) < limit:
                    draft.append(draft[len(draft) - (size - at)])
                return draft
        return []

    def draft(self, limit: int) -> list[int]:
        """This step's draft: at most `limit` tokens (the scheduler's cap) and the sequence's own length."""
        if self.pause:
            self.pause -= 1
            return []
        return self.lookup(min(limit, self.max_len))

    def update(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them were the model's choice."""
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
