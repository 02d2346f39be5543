"""A draft model: a smaller model with the target's vocabulary guesses each greedy sequence's next tokens.

It has its own llama.cpp context with one KV sequence per target slot (the same ids). Its KV follows
the target's lazily: before drafting for a sequence it drops what differs from the sequence's context
(the rejected tail of the last draft, or another request's tokens in a reused slot) and decodes what it
lacks, so nothing else in the scheduler has to keep it in step. Decoding a long prompt it has not seen
is spread over steps (CATCH_UP_CHUNK tokens each), so one new request never stalls the other streams.

Whether a draft pays, and how long it should be, is the scheduler's decision (speculative.py,
best_draft_len): it knows what a pass of this model costs from `pass_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

import llama_cpp
import numpy as np

from ggufchat.engine.loader import LoadedModel, LoadOptions
from ggufchat.engine.sampling import LogitsRows
from ggufchat.engine.tokens import common_prefix
from ggufchat.errors import ModelLoadError

CATCH_UP_CHUNK = 256  # most tokens of a sequence's missing context the draft model decodes in one step
P_MIN = 0.5  # a draft ends where the draft model's own top probability falls below this
MAX_VOCAB_DIFFERENCE = 128  # llama.cpp's limit: padded vocabularies of one family differ by a few ids
_EWMA = 0.2


def load_draft(options: LoadOptions, target: LoadedModel, ends: Iterable[int] = ()) -> DraftModel:
    """Load --model-draft beside `target`: its own context of the same shape (sequences, context per
    sequence, batch, threads), its layers offloaded per -ngld. Refused when its vocabulary differs.
    `ends`: the target's end-of-generation tokens (one vocabulary)."""
    o = options
    draft_options = replace(o, model_path=o.model_draft, n_gpu_layers=o.n_gpu_layers_draft, n_ctx=target.n_ctx,
                            model_draft=None, spec="none")
    model = LoadedModel(draft_options)
    try:
        check_same_vocab(target, model)
        return DraftModel(model, target_n_vocab=llama_cpp.llama_vocab_n_tokens(target.vocab), ends=ends,
                          size_ratio=model.path.stat().st_size / max(1, target.path.stat().st_size))
    except BaseException:
        model.close()
        raise


def _text(vocab, token: int) -> bytes:
    return llama_cpp.llama_vocab_get_text(vocab, token) or b""


def check_same_vocab(target: LoadedModel, draft: LoadedModel) -> None:
    """The draft model's token ids must mean what they mean to the target: the same tokenizer kind, the
    same text for every id both have, the same BOS/EOS. (llama.cpp's rule; a mismatch is refused rather
    than drafting tokens that are never accepted.)"""
    tv, dv = target.vocab, draft.vocab
    name = f"the draft model {draft.path.name}"
    hint = ("Use a smaller model of the target's family (same tokenizer), e.g. Qwen2.5-0.5B-Instruct "
            "to draft for Qwen2.5-7B-Instruct.")
    if llama_cpp.llama_vocab_type(tv) != llama_cpp.llama_vocab_type(dv):
        raise ModelLoadError(f"{name} has another kind of tokenizer than {target.path.name}", hint=hint)
    nt, nd = llama_cpp.llama_vocab_n_tokens(tv), llama_cpp.llama_vocab_n_tokens(dv)
    if abs(nt - nd) > MAX_VOCAB_DIFFERENCE:
        raise ModelLoadError(f"{name} has {nd} tokens and {target.path.name} {nt}: not the same vocabulary",
                             hint=hint)
    for which in ("bos", "eos"):
        get = getattr(llama_cpp, f"llama_vocab_{which}")
        if get(tv) != get(dv):
            raise ModelLoadError(f"{name} has another {which.upper()} token ({get(dv)}) than "
                                 f"{target.path.name} ({get(tv)})", hint=hint)
    for token in range(min(nt, nd)):
        a, b = _text(tv, token), _text(dv, token)
        if a != b:
            raise ModelLoadError(f"{name}'s token {token} is {b!r}, {target.path.name}'s is {a!r}: "
                                 "not the same vocabulary", hint=hint)


class DraftModel:
    """The draft model's context, owned by the engine thread like the target's."""

    def __init__(self, model: LoadedModel, *, target_n_vocab: int, ends: Iterable[int] = (),
                 size_ratio: float = 1.0) -> None:
        self.model = model
        # Before a pass is measured, one is priced as this share of a target step (both read their weights
        # once a token; a CPU decode is bound by that).
        self.size_ratio = size_ratio
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        # Ids the target does not have (a padded draft vocabulary) end a draft: they never reach the target.
        self.target_n_vocab = target_n_vocab
        # An end-of-generation token ends a draft too: a reply that ends there reads nothing drafted after
        # it, and one that goes on never chose it.
        self.ends = frozenset(ends)
        self.rows = LogitsRows(self.n_vocab)
        self.tokens: list[list[int]] = [[] for _ in range(model.n_seq_max)]  # per sequence id: its KV
        self.batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self.pass_seconds: float | None = None  # EWMA of one drafting pass (one token per sequence)
        self.seconds = 0.0  # all time spent in the draft model
        self.passes = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """A context's first decode allocates its compute buffers and wakes its threads (over a second,
        measured): do it now, so the first drafting pass is not priced on it."""
        n = self._add(0, 0, 0, [max(0, llama_cpp.llama_vocab_bos(self.model.vocab))], logits=True)
        self.batch.n_tokens = n
        llama_cpp.llama_decode(self.model.ctx, self.batch)
        llama_cpp.llama_memory_seq_rm(self.model.memory, 0, -1, -1)

    @property
    def path(self):
        return self.model.path

    def forget(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.model.memory, seq_id, -1, -1)
        self.tokens[seq_id].clear()

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.model.close()

    def draft(self, wants: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """Drafts for several sequences at once: `wants` holds (sequence id, the sequence's context, the
        most tokens to draft). The context is every token the target will hold once this step's next
        token is decoded; the draft continues it. A sequence still catching up drafts nothing this step."""
        t0 = time.perf_counter()
        drafts: dict[int, list[int]] = {}
        live: list[tuple[int, int]] = []  # (sequence id, batch index of its logits) of those drafting
        n = 0
        room = self.model.n_batch
        for sid, context, _ in wants:
            held = self.tokens[sid]
            keep = common_prefix(held, context)
            if keep == len(context):
                keep -= 1  # the last token is decoded again for its logits
            if keep < len(held):
                if not llama_cpp.llama_memory_seq_rm(self.model.memory, sid, keep, -1):
                    llama_cpp.llama_memory_seq_rm(self.model.memory, sid, -1, -1)
                    keep = 0
                del held[keep:]
            missing = context[keep:]
            chunk = missing[:min(CATCH_UP_CHUNK, room - n)]
            if not chunk:
                continue
            n = self._add(n, sid, keep, chunk, logits=len(chunk) == len(missing))
            held.extend(chunk)
            if len(chunk) == len(missing):
                live.append((sid, n - 1))
                drafts[sid] = []
        caught_up = n == len(live)  # a pure drafting pass: its time is what a pass costs
        limits = {sid: limit for sid, _, limit in wants}
        while n:
            self.batch.n_tokens = n
            t = time.perf_counter()
            if llama_cpp.llama_decode(self.model.ctx, self.batch) != 0:
                # The draft is only a guess: a failed decode costs this step's drafts, nothing else.
                for sid, _, _ in wants:
                    self.forget(sid)
                return {}
            if caught_up:
                took = time.perf_counter() - t
                old = self.pass_seconds
                # As StepCosts.record: one preempted pass moves the estimate as if at most 2x (or 1/2x).
                self.pass_seconds = took if old is None else old + _EWMA * (min(max(took, old / 2), old * 2) - old)
            self.passes += 1
            going = []
            for sid, index in live:
                tok = self._pick(index)
                if tok is None:
                    continue
                drafts[sid].append(tok)
                if len(drafts[sid]) < limits[sid]:
                    going.append(sid)
            live, n, caught_up = [], 0, True
            for sid in going:
                held = self.tokens[sid]
                n = self._add(n, sid, len(held), [drafts[sid][-1]], logits=True)
                held.append(drafts[sid][-1])
                live.append((sid, n - 1))
        self.seconds += time.perf_counter() - t0
        return {sid: d for sid, d in drafts.items() if d}

    def _add(self, n: int, sid: int, pos: int, tokens: list[int], logits: bool) -> int:
        b = self.batch
        last = len(tokens) - 1
        for j, tok in enumerate(tokens):
            b.token[n] = tok
            b.pos[n] = pos + j
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = sid
            b.logits[n] = logits and j == last
            n += 1
        return n

    def _pick(self, index: int) -> int | None:
        """The draft model's greedy token from the logits of batch `index`, or None when it is not
        confident enough (its top probability under P_MIN), the target lacks the id, or it ends the reply."""
        row = self.rows.row(self.model.ctx, index)
        tok = int(row.argmax())
        top = row[tok]
        # p(top) = 1 / sum(exp(l - top)): below P_MIN the draft would mostly be refused anyway.
        if tok >= self.target_n_vocab or tok in self.ends or np.exp(row - top, dtype=np.float32).sum() > 1.0 / P_MIN:
            return None
        return tok
