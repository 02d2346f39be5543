"""The batch loop: one thread owns the llama.cpp context and decodes every active sequence together.

Each step builds one llama_batch holding the next token of every generating sequence plus chunks of
pending prompts, decodes it, then samples one token for each sequence whose logits it asked for.
Slots map 1:1 to llama.cpp sequence ids; a slot keeps its KV after its request ends, so a later
request that shares a prefix with it (the next turn of a chat, the same system prompt) skips that
prefill.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from ggufchat.engine.draft_model import DraftModel
from ggufchat.engine.loader import LoadedModel
from ggufchat.engine.logprobs import next_token_logprobs, token_logprob
from ggufchat.engine.sampling import LogitsRows, Sampler, logits_block
from ggufchat.engine.speculative import DraftState, NgramDrafter, NgramPool, StepCosts
from ggufchat.engine.stops import StopMatcher
from ggufchat.engine.tokens import Detokenizer, Tokenizer, common_prefix
from ggufchat.engine.types import Delta, Event, Finish, GenerationRequest, Usage
from ggufchat.errors import DecodeError, EngineStopped
from ggufchat.machine import available_cpus

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


# After handing a step's events to an event loop, wait (at most this long) until the loop has run the
# consumers, down to their socket writes, before decoding the next batch. When the decode threads take
# every CPU, the loop's work would otherwise land in the middle of llama_decode, preempting one decode
# thread while the others spin at a barrier; the cap keeps a busy loop from stalling the engine. With a
# CPU left over (-t 1 on 2 cores) the loop runs there without preempting anything, and waiting would
# only put its work on the path of every token. Measurements: docs/benchmarks.md (the hand-off).
_HANDOFF_WAIT = 0.003


# What one more ubatch per decode step costs, in prompt tokens of prefill saved: an extra pass over the
# weights costs about a one-token decode at every step of a reply, a saved prefill token is paid once; so
# reusing a cached prefix is worth splitting the batch only when it is long (the next turn of a long
# conversation), not for a shared system prompt. See docs/benchmarks.md (slots and ubatches).
FRAGMENT_TOKENS = 256

# The most prompt tokens of a prompt_logprobs request decoded in one step. Each asks llama.cpp for a
# logits row, and llama.cpp grows its output buffer to the most rows one batch ever asked for and keeps
# it (256 rows of 4-byte logits are 50 MB for a 49k vocabulary). Reading each row's log-softmax takes
# time on the engine thread, so a bounded chunk bounds how long one step holds the other sequences
# (docs/benchmarks.md, costs behind design choices).
PROMPT_LOGITS_CHUNK = 256


# Speculation: the most draft tokens one step verifies, over all its sequences, on top of the sequences'
# own next tokens. Within it each draft's length is priced on the measured step costs and the tokens the
# whole step is expected to yield (speculative.py), so a draft that would slow the other sequences more
# than it gains is not made. From SPEC_SHARED_FULL generating sequences on there are no drafts at all: the
# batch is compute-bound on a CPU already (llama.cpp's n-gram mode measured 0.77x with 8 busy slots;
# docs/benchmarks.md, speculation).
SPEC_STEP_TOKENS = 64
SPEC_SHARED_FULL = 4  # from this many generating sequences on, no drafts at all


def draft_room(n_generating: int, n_batch: int) -> int:
    """How many draft tokens a step with `n_generating` generating sequences may add."""
    if n_generating >= SPEC_SHARED_FULL:
        return 0
    return max(0, min(SPEC_STEP_TOKENS - n_generating, n_batch - n_generating))


def handoff_wait(decode_threads: int, cpus: int) -> float:
    """How long the engine waits for an event loop to write a step's tokens (see _HANDOFF_WAIT)."""
    return _HANDOFF_WAIT if decode_threads >= cpus else 0.0


class LoopEmitter:
    """Delivers a sequence's events to an asyncio queue. The scheduler hands a whole step's events for
    one event loop over in a single call_soon_threadsafe: one wake-up of the loop per step instead of
    one per sequence, each of which could preempt a decoding thread on a small machine."""

    def __init__(self, loop, queue) -> None:
        self.loop = loop
        self.queue = queue


def _deliver(items: list, delivered: threading.Event) -> None:
    for events, event in items:
        events.put_nowait(event)
    # The consumers woken above run their step in callbacks already queued; this fires after them.
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, delivered.set)


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    busy: bool = False
    last_used: float = 0.0


@dataclass
class Sequence:
    """A request while the engine works on it. Mutated only by the engine thread, except `cancelled`.
    It comes with its sampler built (Engine.prepare) and the scheduler frees it when the sequence ends."""

    request: GenerationRequest
    emit: Emit | LoopEmitter
    usage: Usage
    sampler: Sampler
    cancelled: bool = False
    slot: Slot | None = None
    detok: Detokenizer | None = None
    stops: StopMatcher | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int | None = None  # sampled, to be decoded in the next step
    fed: int = 0  # tokens this sequence put in the current batch
    batch_index: int = -1  # where its logits are in the current batch, -1 for none
    unsent: list[int] = field(default_factory=list)  # token ids whose text is not emitted yet
    unsent_logprobs: list | None = None  # TokenLogprob of each id in `unsent`, if the request wants them
    prompt_logprobs: list | None = None  # collected chunk by chunk until the prompt is decoded, if wanted
    chunk_index: int = -1  # batch index of the first token of a prompt chunk that outputs every row
    drafter: NgramDrafter | DraftState | None = None  # greedy sequences that may speculate (speculative.py)
    draft: list[int] = field(default_factory=list)  # drafted tokens after next_token in the current batch


def pick_slot(slots: list[Slot], prompt: list[int]) -> Slot:
    """The free slot whose cached tokens save the most prefill of `prompt`, counting a slot that splits
    the busy sequence ids into one more run as FRAGMENT_TOKENS tokens worse; ties go to the least
    recently used slot (the others' caches live longer). At least one slot must be free.

    Why runs matter: with a KV stream per sequence, llama.cpp puts only consecutive sequence ids in one
    ubatch, so every gap among the generating sequences' ids costs one more pass over the weights per
    step (docs/benchmarks.md, slots and ubatches)."""
    busy = {s.seq_id for s in slots if s.busy}

    def extra_runs(seq_id: int) -> int:
        # -1: fills a hole between two runs; 0: extends one; +1: starts a new run
        return 1 - (seq_id - 1 in busy) - (seq_id + 1 in busy)

    return max((s for s in slots if not s.busy),
               key=lambda s: (common_prefix(s.tokens, prompt) - FRAGMENT_TOKENS * extra_runs(s.seq_id), -s.last_used))


class Scheduler:
    def __init__(self, model: LoadedModel, tokenizer: Tokenizer, draft_model: DraftModel | None = None) -> None:
        self.model = model
        self.draft_model = draft_model  # --model-draft: drafts for DraftState sequences (draft_model.py)
        self.draft_max = model.options.longest_draft()
        self.draft_min = model.options.draft_min
        self.step_costs = StepCosts()  # what plain generation steps cost, by size: drafts are priced on it
        # n-grams of finished greedy sequences, drafts for later ones (speculative.py); engine thread only
        self.ngram_pool = NgramPool() if model.options.spec == "ngram" else None
        self.tokenizer = tokenizer
        self.slots = [Slot(i) for i in range(model.n_seq_max)]
        self.n_ctx_seq = model.n_ctx_seq
        self.n_batch = model.n_batch
        # While other sequences are generating, a long prompt is fed in ubatch-sized chunks so their
        # streams keep moving; alone, it gets the whole batch.
        self.n_chunk_shared = min(model.options.n_ubatch, model.n_batch)
        self.eog = frozenset(tokenizer.eog_tokens())
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._outbox: dict = {}  # event loop -> [(queue, event)] of this step, see LoopEmitter
        self._closing = False
        self._accepting = True  # submissions queue in the inbox until run() picks them up
        self._submit_lock = threading.Lock()
        self.failure: EngineStopped | None = None  # why the loop died, if it did
        self._started = False
        self._stopped = threading.Event()
        ctx = model.ctx  # the thread counts the context was made with, defaults resolved
        decode_threads = max(llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx))
        self.handoff_wait = handoff_wait(decode_threads, available_cpus())
        self.steps = 0
        self.drafted_tokens = 0  # speculation: tokens drafted and verified since the model was loaded
        self.accepted_tokens = 0  # of those, the ones the model's greedy choice agreed with
        self.pool_drafted_tokens = 0  # the part of those counts drafted from the n-gram pool
        self.pool_accepted_tokens = 0
        self.decode_seconds = 0.0  # time inside llama_decode: the rest of a step is our own overhead
        self.n_vocab = tokenizer.n_vocab
        self.rows = LogitsRows(tokenizer.n_vocab)  # logits rows for logprobs

    # Called from any thread.
    def submit(self, seq: Sequence) -> None:
        with self._submit_lock:
            if self._closing or not self._accepting:
                raise self.failure or EngineStopped("the engine is not running")
            self._inbox.put(seq)

    def call(self, fn: Callable[[], None]) -> threading.Event:
        """Run fn on the engine thread between steps; the returned event is set when it has run."""
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        self._inbox.put(wrapped)
        return done

    def forget_cached(self) -> None:
        """Engine thread only: drop the KV of every idle slot and the n-gram pool, so no later request
        reuses what earlier ones left."""
        for slot in self.slots:
            if not slot.busy:
                llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
                slot.tokens.clear()
                if self.draft_model is not None:
                    self.draft_model.forget(slot.seq_id)
        if self.ngram_pool is not None:  # what earlier requests said is forgotten too
            self.ngram_pool.clear()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(None)  # wake the loop if it is idle

    def close(self) -> None:
        """Stop the loop; returns once `run` has failed every pending request and returned."""
        self._closing = True
        self._inbox.put(None)
        if self._started:
            self._stopped.wait()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def batch_order(self) -> list[int]:
        """Engine thread only (Scheduler.call): the sequence ids of the active sequences, in the order
        they go into a batch."""
        return [seq.slot.seq_id for seq in self._active]

    # The engine thread.
    def run(self) -> None:
        """The loop; runs on the thread that loaded the model, until close()."""
        self._started = True
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        try:
            pool = self.ngram_pool
            while not self._closing:
                self._drain_inbox(block=not self._active and not self._waiting
                                  and not (pool is not None and pool.pending))
                if self._closing:
                    break
                self._reap_cancelled()
                self._admit()
                if self._active:
                    self._step(batch)
                self._flush()
                if pool is not None and pool.pending:
                    pool.index()  # a chunk a step: learning a long sequence never stalls the others
        except BaseException as exc:  # the loop must never die silently with requests pending
            log.exception("engine loop failed")
            self.failure = EngineStopped(f"the engine stopped: {type(exc).__name__}: {exc}")
            self._fail_all(self.failure)
            self._closing = True
        finally:
            with self._submit_lock:  # no submission may slip in between this and the last drain
                self._accepting = False
            llama_cpp.llama_batch_free(batch)
            self._drain_inbox(block=False)
            self._fail_all(EngineStopped("the engine was closed"))
            self._flush()
            self._stopped.set()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Sequence):
                    self._waiting.append(item)
                elif item is not None:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._finish(seq, "cancelled")
        if any(s.cancelled for s in self._waiting):
            kept = collections.deque()
            for seq in self._waiting:
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                else:
                    kept.append(seq)
            self._waiting = kept

    def _admit(self) -> None:
        while self._waiting:
            if all(s.busy for s in self.slots):
                return
            seq = self._waiting.popleft()
            # A prompt_logprobs request decodes its whole prompt, whatever a slot holds: so take the slot
            # whose cache is worth least to others.
            prompt = [] if seq.request.prompt_logprobs is not None else seq.request.prompt_tokens
            self._bind(seq, pick_slot(self.slots, prompt))

    def _bind(self, seq: Sequence, slot: Slot) -> None:
        prompt = seq.request.prompt_tokens
        req = seq.request
        keep = common_prefix(slot.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # the last prompt token must be decoded again to get its logits
        if req.prompt_logprobs is not None:
            keep = 0  # every position's logits are needed, and cached KV has none
            seq.prompt_logprobs = [None]  # the first token has no context
        if req.logprobs is not None:
            seq.unsent_logprobs = []
        mem = self.model.memory
        if not llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, keep, -1):
            # Some caches (recurrent, sliding-window) cannot drop a tail; start the sequence over.
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        slot.busy = True
        seq.slot = slot
        seq.pending = list(prompt[keep:])
        seq.usage.cached_tokens = keep
        seq.usage.t_start = time.perf_counter()
        seq.detok = Detokenizer(self.tokenizer)
        seq.stops = StopMatcher(req.stop)
        # Keep the batch in sequence-id order: llama.cpp decodes a batch whose sequence ids are out of
        # order markedly slower with a KV stream per sequence (docs/benchmarks.md, batch order). Slots
        # are taken in any order, so sort here.
        bisect.insort(self._active, seq, key=lambda s: s.slot.seq_id)

    def _step(self, batch) -> None:
        n = 0
        n_generating = sum(s.next_token is not None for s in self._active)
        generating = n_generating > 0
        room = draft_room(n_generating, self.n_batch)
        model_drafts = self._model_drafts(room, n_generating) if self.draft_model is not None and room > 0 else {}
        for seq in self._active:
            seq.fed = 0
            seq.batch_index = -1
            if seq.next_token is not None:
                if seq.slot.seq_id in model_drafts:
                    draft = model_drafts[seq.slot.seq_id]
                elif isinstance(seq.drafter, NgramDrafter):
                    draft = self._draft(seq, room, n_generating) if room > 0 else []
                    if not draft:
                        seq.drafter.watch()
                else:
                    draft = []
                room -= len(draft)
                seq.draft = draft
                n = self._add(batch, n, seq, [seq.next_token, *draft], logits_last=True, n_logits=1 + len(draft))
        budget_cap = self.n_chunk_shared if generating else self.n_batch
        n_generation = n
        for seq in self._active:
            if not seq.pending:
                continue
            budget = min(self.n_batch - n, budget_cap)
            if budget <= 0:
                break
            if seq.prompt_logprobs is not None:
                chunk = seq.pending[:min(budget, PROMPT_LOGITS_CHUNK)]
                seq.chunk_index = n
                n = self._add_all(batch, n, seq, chunk, last=len(chunk) == len(seq.pending))
            else:
                chunk = seq.pending[:budget]
                n = self._add(batch, n, seq, chunk, logits_last=len(chunk) == len(seq.pending))
            budget_cap -= len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        t0 = time.perf_counter()
        status = llama_cpp.llama_decode(self.model.ctx, batch)
        took = time.perf_counter() - t0
        self.decode_seconds += took
        self.steps += 1
        if n == n_generation:
            self.step_costs.record(n, took, sequences=n_generating)
        if status != 0:
            self._decode_failed(status)
            return
        prompt_only = []
        for seq in self._active:
            if seq.fed:
                if seq.next_token is not None:
                    seq.slot.tokens.append(seq.next_token)
                    seq.next_token = None
                else:
                    if seq.prompt_logprobs is not None:
                        self._read_prompt_logprobs(seq)
                    seq.slot.tokens.extend(seq.pending[: seq.fed])
                    del seq.pending[: seq.fed]
                    if not seq.pending and self._prompt_decoded(seq):
                        prompt_only.append(seq)
        for seq in prompt_only:
            self._finish(seq, "length")
        for seq in list(self._active):
            if seq.batch_index >= 0:
                self._sample(seq)

    def _read_prompt_logprobs(self, seq: Sequence) -> None:
        """The logprobs of the prompt tokens that follow this step's chunk positions: row j of the chunk
        predicts the token after it."""
        start = len(seq.slot.tokens)  # the chunk's first position (a prompt_logprobs prompt starts at 0)
        prompt = seq.request.prompt_tokens
        following = prompt[start + 1: start + seq.fed + 1]
        if following:
            rows = logits_block(self.model.ctx, seq.chunk_index, len(following), self.n_vocab)
            seq.prompt_logprobs += next_token_logprobs(rows, following, seq.request.prompt_logprobs)

    def _prompt_decoded(self, seq: Sequence) -> bool:
        """The prompt's last chunk is decoded: deliver its logprobs, before any generated token. True when
        the request wants no token (max_tokens 0): it is done."""
        if seq.prompt_logprobs is not None:
            self._emit(seq, Delta("", [], prompt_logprobs=seq.prompt_logprobs))
            seq.prompt_logprobs = None
        if seq.request.max_tokens == 0:
            seq.batch_index = -1
            return True
        return False

    def _add(self, batch, n: int, seq: Sequence, tokens: list[int], logits_last: bool, n_logits: int = 1) -> int:
        """Put `tokens` in the batch; with logits_last, ask for the logits of the last n_logits of them
        (the next token and its draft) and point batch_index at the first of those rows."""
        pos = len(seq.slot.tokens)
        sid = seq.slot.seq_id
        first_out = len(tokens) - n_logits if logits_last else len(tokens)
        for j, tok in enumerate(tokens):
            batch.token[n] = tok
            batch.pos[n] = pos + j
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sid
            batch.logits[n] = j >= first_out
            n += 1
        seq.fed = len(tokens)
        if logits_last:
            seq.batch_index = n - n_logits
        return n

    def _add_all(self, batch, n: int, seq: Sequence, tokens: list[int], last: bool) -> int:
        """Like _add, asking for the logits of every token (prompt logprobs)."""
        pos = len(seq.slot.tokens)
        sid = seq.slot.seq_id
        for j, tok in enumerate(tokens):
            batch.token[n] = tok
            batch.pos[n] = pos + j
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sid
            batch.logits[n] = True
            n += 1
        seq.fed = len(tokens)
        if last:
            seq.batch_index = n - 1
        return n

    def _draft_limit(self, seq: Sequence, room: int) -> int:
        """The most tokens `seq` may draft after its next token this step: at most `room`, none past its
        max_tokens or the end of its context."""
        limit = room
        req = seq.request
        if req.max_tokens is not None:  # next_token is counted already; the draft adds len + 1 more
            limit = min(limit, req.max_tokens - seq.usage.completion_tokens - 1)
        # next_token takes position len(tokens); the last draft token must leave the last position free
        return min(limit, self.n_ctx_seq - len(seq.slot.tokens) - 2)

    def _draft(self, seq: Sequence, room: int, n_generating: int) -> list[int]:
        limit = min(self._draft_limit(seq, room), self.draft_max)
        if limit <= 0:
            return []
        # Looking up costs nothing: only verifying is priced, on the measured step costs.
        return seq.drafter.draft(limit, self.step_costs.view(n_generating), n_generating)

    def _model_drafts(self, room: int, n_generating: int) -> dict[int, list[int]]:
        """The draft model's drafts for this step, by sequence id: each sequence's length priced on the
        measured cost of a step and of a draft pass, and its own acceptance (speculative.py)."""
        draft = self.draft_model
        costs = self.step_costs.view(n_generating)
        pass_seconds = draft.pass_seconds if draft.pass_seconds is not None else costs(1) * draft.size_ratio
        wants = []
        for seq in self._active:
            if seq.next_token is None or not isinstance(seq.drafter, DraftState) or room <= 0:
                continue
            k_max = min(self._draft_limit(seq, room), self.draft_max)
            k = seq.drafter.draft_len(costs, pass_seconds, n_generating, k_max) if k_max > 0 else 0
            if k < max(self.draft_min, 1):
                continue
            room -= k
            wants.append((seq.slot.seq_id, [*seq.slot.tokens, seq.next_token], k))
        if not wants:
            return {}
        # --draft-min: a draft the draft model cut short (unsure of its next token) is not worth verifying.
        return {sid: d for sid, d in draft.draft(wants).items() if len(d) >= self.draft_min}

    def _sample(self, seq: Sequence) -> None:
        draft = seq.draft
        if not draft:
            self._sample_at(seq, seq.batch_index)
            return
        seq.draft = []
        slot = seq.slot
        kv_end = len(slot.tokens) + len(draft)  # next_token is in slot.tokens already, the draft is not
        accepted = 0
        for i in range(len(draft) + 1):
            tok = self._sample_at(seq, seq.batch_index + i)
            if tok is None or i == len(draft) or tok != draft[i]:
                break  # finished, or the bonus token, or the model's correction: next_token either way
            # The model chose the drafted token, whose KV this batch computed: keep it, read on.
            seq.next_token = None
            slot.tokens.append(tok)
            accepted += 1
        if len(slot.tokens) < kv_end:
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, len(slot.tokens), -1)
        seq.usage.drafted_tokens += len(draft)
        seq.usage.accepted_tokens += accepted
        self.drafted_tokens += len(draft)
        self.accepted_tokens += accepted
        if isinstance(seq.drafter, NgramDrafter) and seq.drafter.from_pool:
            self.pool_drafted_tokens += len(draft)
            self.pool_accepted_tokens += accepted
        seq.drafter.update(len(draft), accepted)

    def _sample_at(self, seq: Sequence, index: int) -> int | None:
        """Sample from the logits row at batch `index`, emit, and return the token; None when the
        sequence finished on it (end of generation, a stop string, max_tokens, its context)."""
        logprobs = seq.unsent_logprobs
        if logprobs is not None:
            # Read before the sampler runs: greedy writes -inf into the row for banned tokens.
            raw = self.rows.row(self.model.ctx, index).copy()
        tok = seq.sampler.sample(self.model.ctx, index)
        now = time.perf_counter()
        usage = seq.usage
        usage.completion_tokens += 1
        if not usage.t_first_token:
            usage.t_first_token = now
        req = seq.request
        if tok in self.eog and not req.ignore_eos:
            self._finish(seq, "stop", eog_token=tok)
            return None
        seq.unsent.append(tok)
        if logprobs is not None:
            logprobs.append(token_logprob(raw, tok, req.logprobs))
        text, hit = seq.stops.push(seq.detok.push(tok))
        if text:
            self._emit(seq, Delta(text, seq.unsent, logprobs))
            seq.unsent = []
            if logprobs is not None:
                seq.unsent_logprobs = []
        if hit:
            self._finish(seq, "stop", flush=False)
        elif req.max_tokens is not None and usage.completion_tokens >= req.max_tokens:
            self._finish(seq, "length")
        elif len(seq.slot.tokens) + 1 >= self.n_ctx_seq:
            # This token took the sequence's last position: prompt + completion == its context.
            self._finish(seq, "length")
        else:
            seq.next_token = tok
            if seq.drafter is not None:
                seq.drafter.push(tok)
            return tok
        return None

    def _emit(self, seq: Sequence, event: Event) -> None:
        emit = seq.emit
        if isinstance(emit, LoopEmitter):
            self._outbox.setdefault(emit.loop, []).append((emit.queue, event, seq))
            return
        try:
            seq.emit(event)
        except Exception:  # the consumer is gone (closed event loop): stop working for it
            log.debug("request %s: consumer gone, cancelling", seq.request.id, exc_info=True)
            seq.cancelled = True

    def _finish(self, seq: Sequence, reason: str, *, flush: bool = True, error: BaseException | None = None,
                eog_token: int | None = None) -> None:
        if flush and reason != "cancelled" and seq.detok is not None:
            tail = seq.stops.push(seq.detok.flush())[0] + seq.stops.flush()
            if tail or seq.unsent:
                self._emit(seq, Delta(tail, seq.unsent, seq.unsent_logprobs))
        seq.usage.t_end = time.perf_counter()
        if self.ngram_pool is not None and isinstance(seq.drafter, NgramDrafter) and reason in ("stop", "length"):
            self.ngram_pool.learn(seq.drafter.history)
        self._emit(seq, Finish(reason, seq.usage, error, eog_token))
        seq.sampler.free()  # idempotent
        if seq.slot is not None:
            seq.slot.busy = False
            seq.slot.last_used = seq.usage.t_end
        if seq in self._active:
            self._active.remove(seq)

    def _flush(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        waits = []
        for loop, items in outbox.items():
            delivered = threading.Event()
            try:
                loop.call_soon_threadsafe(_deliver, [(queue, event) for queue, event, _ in items], delivered)
                waits.append(delivered)
            except RuntimeError:  # the loop is closed: nobody will read these sequences again
                for _, _, seq in items:
                    seq.cancelled = True
        if self._active and self.handoff_wait:
            for delivered in waits:
                delivered.wait(self.handoff_wait)

    def _decode_failed(self, status: int) -> None:
        # The batch is lost; so are the sequences in it. Their slots start over so later requests
        # never see a half-written cache.
        error = DecodeError(f"llama_decode failed with status {status}")
        log.error("%s", error)
        for seq in [s for s in self._active if s.fed]:
            llama_cpp.llama_memory_seq_rm(self.model.memory, seq.slot.seq_id, -1, -1)
            seq.slot.tokens.clear()
            self._finish(seq, "error", flush=False, error=error)

    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self._active):
            try:
                self._finish(seq, "error", flush=False, error=error)
            except Exception:
                log.exception("while failing request %s", seq.request.id)
        while self._waiting:
            self._finish(self._waiting.popleft(), "error", flush=False, error=error)
