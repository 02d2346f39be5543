"""Embeddings: pooled, L2-normalised vectors for texts or token lists, from a second llama.cpp context.

The engine's generation context cannot give pooled embeddings, so an embedding context is created on
the same loaded model (the weights are shared, only its small compute and output buffers are new):
`embeddings` on, the pooling the GGUF names (`<arch>.pooling_type`, mean when it names none), one
sequence id per input, and `n_ubatch == n_batch`, since an encoder and a pooled embedding both need
a whole input in one ubatch. It runs on the engine thread, between generation steps, one llama batch
per call (`Scheduler.call`): llama.cpp's compute threads belong to the thread that first computes, and
a second team of them on another thread would fight the decode loop for the same cores. A request of
many inputs is packed into as few batches as fit, and generation goes on between those batches.

BERT-style encoders (non-causal attention, no KV cache) go through `llama_encode`; decoder models
through `llama_decode`, their KV cleared after each batch. Every id and length from a client is checked
here, on the caller's thread, before llama.cpp sees it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ggufchat.engine.loader import LoadedModel, default_threads
from ggufchat.engine.tokens import Tokenizer
from ggufchat.errors import DecodeError, EngineStopped, GgufchatError, InvalidParameter, ModelLoadError

log = logging.getLogger(__name__)

# Pooling as llama.cpp numbers it (enum llama_pooling_type), and as the GGUF key stores it.
POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
_MEAN, _RANK = 1, 4
MAX_INPUTS = 2048  # inputs in one request (OpenAI's limit)
MAX_TOKENS_PER_INPUT = 8192  # an input's longest length, whatever the model was trained for
BATCH_TOKENS = 512  # tokens packed into one llama batch (at least one whole input); see docs/embeddings.md
BATCH_SEQS = 64  # inputs packed into one llama batch

EmbeddingInput = str | Sequence[int]


class EmbeddingCancelled(GgufchatError):
    """The caller's `stop` was set before every batch was computed (a timeout, a client that left)."""


@dataclass(frozen=True)
class Embeddings:
    """One L2-normalised float32 row per input, in input order, and each input's token count."""

    vectors: np.ndarray  # shape (n_inputs, dimensions), dtype float32
    token_counts: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class EmbeddingSpec:
    """What an embedding context of a model does: fixed once the model is loaded."""

    n_embd: int
    pooling: str  # mean, cls or last
    encoder: bool  # non-causal (BERT-style): llama_encode
    max_tokens: int  # the longest input, in tokens


def spec_for(model: LoadedModel, n_ctx_seq: int) -> EmbeddingSpec:
    """Read pooling and attention from the GGUF; refuse a model whose output is not an embedding."""
    info = model.info
    arch = info.architecture or ""
    pooling = info.get(f"{arch}.pooling_type")
    pooling = _MEAN if pooling in (None, 0) else int(pooling)  # none: decoders pool by mean here
    if pooling == _RANK:
        raise InvalidParameter("this model is a reranker (pooling type rank): it scores pairs of texts, it does "
                               "not embed them", param="model")
    if pooling not in POOLING:
        raise InvalidParameter(f"this model names pooling type {pooling}, which llama.cpp does not know",
                               param="model")
    causal = info.get(f"{arch}.attention.causal", True)
    encoder = not causal or bool(llama_cpp.llama_model_has_encoder(model.model))
    # An encoder's positions end at its training context (BERT's learned position table); a decoder's
    # input is held to what one of the engine's sequences holds.
    trained = info.context_length or n_ctx_seq
    limit = min(trained, MAX_TOKENS_PER_INPUT) if encoder else min(trained, n_ctx_seq, MAX_TOKENS_PER_INPUT)
    return EmbeddingSpec(n_embd=int(llama_cpp.llama_model_n_embd_out(model.model)), pooling=POOLING[pooling],
                         encoder=encoder, max_tokens=max(1, limit))


class Embedder:
    """The embedding context of one loaded model. `embed` may be called from any thread (it blocks);
    the llama.cpp work runs through `run_on_engine`, which runs a function on the engine thread."""

    def __init__(self, model: LoadedModel, tokenizer: Tokenizer, spec: EmbeddingSpec,
                 run_on_engine: Callable[[Callable[[], None]], threading.Event],
                 engine_alive: Callable[[], bool]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self._run = run_on_engine
        self._alive = engine_alive
        self._ctx = None
        self._memory = None
        self._batch = None
        self._closed = False
        self.n_batch = max(spec.max_tokens, BATCH_TOKENS)
        self.pack_tokens = BATCH_TOKENS

    # Any thread.
    def tokenize(self, inputs: Sequence[EmbeddingInput], param: str = "input",
                 truncate: bool = False) -> list[list[int]]:
        """Each input as the token ids the model embeds: text with the model's special tokens around it
        (BOS; BERT's [CLS] .. [SEP]) and never parsed for special tokens; a token list as given."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise InvalidParameter("input is empty: give a string, an array of strings or of token arrays",
                                   param=param)
        if len(inputs) > MAX_INPUTS:
            raise InvalidParameter(f"input has {len(inputs)} items; at most {MAX_INPUTS}", param=param)
        lists: list[list[int]] = []
        for i, item in enumerate(inputs):
            where = f"{param}[{i}]" if len(inputs) > 1 else param
            if isinstance(item, str):
                if not item:
                    raise InvalidParameter(f"{where} is an empty string", param=param)
                tokens = self.tokenizer.tokenize(item, add_special=True, parse_special=False)
            else:
                tokens = [int(t) for t in item]
                self.tokenizer.check_ids(tokens, param)
            if not tokens:
                raise InvalidParameter(f"{where} has no tokens", param=param)
            if truncate and isinstance(item, str) and len(tokens) > self.spec.max_tokens:
                tokens = self._truncated(item, tokens)
            if len(tokens) > self.spec.max_tokens:
                raise InvalidParameter(
                    f"{where} is {len(tokens)} tokens; this model embeds at most {self.spec.max_tokens} tokens "
                    "per input", param=param, hint="Split the text into smaller chunks.")
            lists.append(tokens)
        return lists

    def _truncated(self, text: str, tokens: list[int]) -> list[int]:
        """`tokens` (text with the model's special tokens around it) cut to the model's limit: the start
        of the text, and the special tokens kept on both sides (BERT's [SEP] ends every input)."""
        plain = self.tokenizer.tokenize(text, add_special=False, parse_special=False)
        head = 1 if len(tokens) > len(plain) and (not plain or tokens[0] != plain[0]) else 0
        tail = max(0, len(tokens) - len(plain) - head)
        keep = max(0, self.spec.max_tokens - head - tail)
        return tokens[:head] + plain[:keep] + tokens[len(tokens) - tail:]

    def embed(self, inputs: Sequence[EmbeddingInput], *, dimensions: int | None = None,
              stop: threading.Event | None = None, truncate: bool = False) -> Embeddings:
        """Normalised vectors for texts and/or token lists (blocks until the engine thread is done). Once
        `stop` is set, no further batch starts: EmbeddingCancelled."""
        if dimensions is not None and not 1 <= dimensions <= self.spec.n_embd:
            raise InvalidParameter(f"dimensions must be between 1 and {self.spec.n_embd} (this model's size), "
                                   f"not {dimensions}", param="dimensions")
        token_lists = self.tokenize(inputs, truncate=truncate)
        vectors = np.empty((len(token_lists), self.spec.n_embd), dtype=np.float32)
        for group in self._groups(token_lists):
            if stop is not None and stop.is_set():
                raise EmbeddingCancelled("the embeddings were cancelled")
            rows = self._on_engine(lambda group=group: self._embed_batch([token_lists[i] for i in group]))
            vectors[group] = rows
        vectors = _normalise(vectors)
        if dimensions is not None and dimensions < self.spec.n_embd:
            # Matryoshka truncation: the first `dimensions` components, normalised again.
            vectors = _normalise(np.ascontiguousarray(vectors[:, :dimensions]))
        return Embeddings(vectors, [len(t) for t in token_lists])

    def _groups(self, token_lists: list[list[int]]) -> list[list[int]]:
        """Input indices packed into llama batches, in order: at most n_batch tokens and BATCH_SEQS inputs."""
        groups: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i, tokens in enumerate(token_lists):
            if current and (used + len(tokens) > self.pack_tokens or len(current) == BATCH_SEQS):
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += len(tokens)
        if current:
            groups.append(current)
        return groups

    def _on_engine(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        result: Future = Future()

        def call() -> None:  # runs on the engine thread: it must never raise into the decode loop
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        done = self._run(call)
        while not done.wait(0.25):
            if not self._alive() and not done.is_set():
                raise EngineStopped("the engine stopped before the embeddings were computed")
        return result.result()

    # Engine thread.
    def _ensure_context(self) -> None:
        if self._closed:
            raise EngineStopped("the engine was closed")
        if self._ctx is not None:
            return
        o = self.model.options
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = {"mean": 1, "cls": 2, "last": 3}[self.spec.pooling]
        params.n_ctx = self.n_batch
        params.n_batch = params.n_ubatch = self.n_batch  # a whole input (and batch) in one ubatch
        params.n_seq_max = BATCH_SEQS
        params.kv_unified = True  # inputs of any length share the one KV buffer of a decoder
        threads = o.n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = o.n_threads_batch or threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not ctx:
            raise ModelLoadError("llama.cpp could not create an embedding context for this model")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)  # NULL for encoders: they keep no KV
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _embed_batch(self, token_lists: list[list[int]]) -> np.ndarray:
        self._ensure_context()
        batch, ctx = self._batch, self._ctx
        n = 0
        for sid, tokens in enumerate(token_lists):
            for pos, tok in enumerate(tokens):
                batch.token[n] = tok
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sid
                batch.logits[n] = True  # pooling reads every token's output
                n += 1
        batch.n_tokens = n
        if self._memory:
            llama_cpp.llama_memory_clear(self._memory, True)
        status = llama_cpp.llama_encode(ctx, batch) if self.spec.encoder else llama_cpp.llama_decode(ctx, batch)
        if self._memory:
            llama_cpp.llama_memory_clear(self._memory, True)
        if status != 0:
            raise DecodeError(f"llama.cpp could not compute embeddings (status {status})")
        out = np.empty((len(token_lists), self.spec.n_embd), dtype=np.float32)
        for sid in range(len(token_lists)):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, sid)
            if not ptr:
                raise DecodeError(f"llama.cpp returned no pooled embedding for sequence {sid}")
            out[sid] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(self.spec.n_embd,))
        return out

    def close(self) -> None:
        """Free the context (once the engine thread no longer runs it)."""
        self._closed = True
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """The pairwise cosine similarities of L2-normalised rows."""
    return np.clip(vectors @ vectors.T, -1.0, 1.0)
