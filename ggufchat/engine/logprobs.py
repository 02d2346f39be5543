"""Log-probabilities of tokens, from raw logits rows.

They are the log-softmax of the logits llama.cpp returned, read before any sampler touches the row:
temperature, penalties, a grammar and banned tokens change what gets sampled, not what the model
said, and OpenAI reports the model's own distribution too. The log-sum-exp is taken stably in float32
(exponentials of `row - max`, all <= 1) and summed in float64; top alternatives come from an
argpartition, so a request pays O(n_vocab) per row and nothing more. Only requests that ask pay anything.
"""

from __future__ import annotations

import numpy as np

from ggufchat.engine.types import TokenLogprob

MAX_TOP = 20  # OpenAI's limit on top_logprobs
# Rows handled at once in the bulk path: bounds the float32 temporaries (_BLOCK x n_vocab).
_BLOCK = 16
_SLICES = 64


def log_normalizers(rows: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) for every row of a [k, n_vocab] float32 array, as float64."""
    peak = rows.max(axis=1)
    shifted = rows - peak[:, None]
    np.exp(shifted, out=shifted)
    return peak.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))


def _top(row: np.ndarray, norm: float, n: int) -> list[tuple[int, float]]:
    """The n best (id, logprob) of a row, best first; equal logits go to the lower id, as argmax does.

    Much cheaper than an argpartition of the row (docs/benchmarks.md, costs behind design choices): the
    n largest of the maxima of 64
    interleaved slices of the row are n distinct elements, so the row's n-th largest value is at least
    the n-th largest of those maxima, and only the few elements above that threshold need sorting."""
    if n <= 0:
        return []
    size = row.size
    n = min(n, size)
    width = size // _SLICES
    if width >= n:
        maxima = row[:width * _SLICES].reshape(_SLICES, width).max(axis=0)
        floor = np.partition(maxima, width - n)[width - n]
    else:  # a tiny vocabulary
        floor = np.partition(row, size - n)[size - n]
    ids = np.flatnonzero(row >= floor)  # every tie at the floor too, so the lowest ids win
    vals = row[ids]
    best = np.lexsort((ids, -vals))[:n]
    return list(zip(ids[best].tolist(), (vals[best].astype(np.float64) - norm).tolist(), strict=True))


def token_logprob(row: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """One generated token's logprob and the n_top best alternatives, from its position's logits row."""
    norm = float(log_normalizers(row[None, :])[0])
    return TokenLogprob(token, float(row[token]) - norm, _top(row, norm, n_top))


def next_token_logprobs(rows: np.ndarray, next_tokens: list[int], n_top: int) -> list[TokenLogprob]:
    """For every row j of a [k, n_vocab] array, the logprob of next_tokens[j] (the token that followed
    the position rows[j] was computed at) and the n_top best alternatives. Vectorised over the rows."""
    out: list[TokenLogprob] = []
    for start in range(0, len(next_tokens), _BLOCK):
        block = rows[start:start + _BLOCK]
        toks = np.asarray(next_tokens[start:start + _BLOCK], dtype=np.int64)
        norms = log_normalizers(block)
        chosen = block[np.arange(len(toks)), toks].astype(np.float64) - norms
        out += [TokenLogprob(t, lp, _top(r, norm, n_top))
                for t, lp, r, norm in zip(toks.tolist(), chosen.tolist(), block, norms.tolist(), strict=True)]
    return out


def full_logprobs(row: np.ndarray) -> np.ndarray:
    """The whole log-softmax of one row (float64); for tests and checks, not the serving path."""
    return row.astype(np.float64) - log_normalizers(row[None, :])[0]
