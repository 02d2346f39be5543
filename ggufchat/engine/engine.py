"""The engine facade: load a model, turn chats into tokens, submit requests, stream their events."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ggufchat.engine import grammar as gbnf
from ggufchat.engine.describe import generates
from ggufchat.engine.draft_model import load_draft
from ggufchat.engine.embeddings import Embedder, EmbeddingInput, Embeddings, EmbeddingSpec, spec_for
from ggufchat.engine.loader import LoadedModel, LoadOptions
from ggufchat.engine.logprobs import MAX_TOP
from ggufchat.engine.sampling import ArgmaxSampler, Sampler, make_sampler
from ggufchat.engine.scheduler import LoopEmitter, Scheduler, Sequence
from ggufchat.engine.speculative import DraftState, NgramDrafter
from ggufchat.engine.templates import ChatTemplate, Segment, tokenize_segments
from ggufchat.engine.tokens import Tokenizer
from ggufchat.engine.types import Delta, EngineStats, Event, Finish, GenerationRequest, Usage, Vocabulary
from ggufchat.errors import ContextOverflow, EngineStopped, InvalidParameter, TemplateError

log = logging.getLogger(__name__)

# Variables the engine sets on every render; a request's template_kwargs may not replace them.
_TEMPLATE_OWN = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


class Stream:
    """The events of one request, for a synchronous consumer. Iterate; the last event is a Finish."""

    def __init__(self, engine: Engine, seq: Sequence, events: queue.SimpleQueue) -> None:
        self._engine = engine
        self._seq = seq
        self._events = events
        self.finish: Finish | None = None

    def __iter__(self) -> Iterator[Event]:
        while self.finish is None:
            event = self._events.get()
            if isinstance(event, Finish):
                self.finish = event
            yield event

    def cancel(self) -> None:
        self._engine.scheduler.cancel(self._seq)

    def text(self) -> str:
        """Wait for the end and return the whole completion text."""
        return "".join(e.text for e in self if isinstance(e, Delta))

    def tokens(self) -> list[int]:
        return [t for e in self if isinstance(e, Delta) for t in e.token_ids]


class AsyncStream:
    """The events of one request, for an asyncio consumer."""

    def __init__(self, engine: Engine, seq: Sequence, events: asyncio.Queue) -> None:
        self._engine = engine
        self._seq = seq
        self._events = events
        self.finish: Finish | None = None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while self.finish is None:
            yield await self.next()

    async def next(self) -> Event:
        """The next event; call only while `finish` is None. A plain coroutine: a server streaming
        tokens awaits this once per token, without an async generator's frames around it."""
        event = await self._events.get()
        if isinstance(event, Finish):
            self.finish = event
        return event

    def cancel(self) -> None:
        self._engine.scheduler.cancel(self._seq)


class Prepared:
    """A request checked against the model, with its sampler built: the part of submitting that can
    take long (a big prompt's ids, a grammar to compile), done on the caller's thread so that neither
    an event loop nor the engine thread waits for it. Submit it, or discard() it."""

    def __init__(self, request: GenerationRequest, sampler: Sampler, drafter: NgramDrafter | None = None) -> None:
        self.request = request
        self.sampler: Sampler | None = sampler
        self.drafter = drafter  # the prompt indexed for n-gram drafts, when this request may speculate

    def take_sampler(self) -> Sampler:
        if self.sampler is None:
            raise RuntimeError("this request was already submitted")
        sampler, self.sampler = self.sampler, None
        return sampler

    def discard(self) -> None:
        if self.sampler is not None:
            self.take_sampler().free()


class Engine:
    """One loaded model serving up to `n_seq_max` sequences at once.

    Its parts (`model`, `tokenizer`, `scheduler`) belong to the engine package: code above it uses the
    members of this class, so the parts can change without their callers changing."""

    def __init__(self, options: LoadOptions, *, chat_template: str | None = None,
                 chat_template_file: str | Path | None = None,
                 grammar_limits: gbnf.GrammarLimits | None = None) -> None:
        self.options = options
        self.grammar_limits = grammar_limits or gbnf.GrammarLimits()
        self._closed = False
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        # The model is loaded on the thread that will decode with it: llama.cpp's OpenMP team belongs
        # to the thread that first computes, and a second team left spinning by a loading thread slows
        # every decode (measured: docs/benchmarks.md, costs behind design choices).
        ready: Future = Future()
        self._thread = threading.Thread(target=self._engine_thread, args=(options, ready),
                                        name="ggufchat-engine", daemon=True)
        self._thread.start()
        self.model, self.tokenizer, self.scheduler = ready.result()
        tok = self.tokenizer
        # Fixed for the model's life, and kept here so they can still be read after close() frees it.
        self.vocabulary = Vocabulary(n_vocab=tok.n_vocab, bos=tok.bos if tok.bos >= 0 else None,
                                     eos=tok.eos if tok.eos >= 0 else None, add_bos=tok.add_bos)
        try:
            self._description = self.model.description()
            info = self.model.info
            self.generates = generates(info, self.model.model)
            self._offload_summary = self.model.offload_summary()
            self.template = self._pick_template(chat_template, chat_template_file)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _engine_thread(options: LoadOptions, ready: Future) -> None:
        try:
            model = LoadedModel(options)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        draft = None
        try:
            tokenizer = Tokenizer(model.vocab)
            # On this thread too: it decodes on it, with the same OpenMP team as the target.
            draft = load_draft(options, model, tokenizer.eog_tokens()) if options.model_draft is not None else None
            scheduler = Scheduler(model, tokenizer, draft)
        except BaseException as exc:
            if draft is not None:
                draft.close()
            model.close()
            ready.set_exception(exc)
            return
        ready.set_result((model, tokenizer, scheduler))
        # The model outlives a failed loop: other threads may still be tokenizing with its vocabulary,
        # and freeing it under them would crash the process. Engine.close() frees it.
        scheduler.run()

    # Identity.
    @property
    def model_path(self) -> Path:
        return self.model.path

    @property
    def model_name(self) -> str:
        return self.model.path.name

    @property
    def n_ctx_seq(self) -> int:
        return self.model.n_ctx_seq

    @property
    def n_seq_max(self) -> int:
        return self.model.n_seq_max

    @property
    def n_vocab(self) -> int:
        return self.vocabulary.n_vocab

    @property
    def model_description(self) -> str:
        """llama.cpp's one-line description of the model, e.g. 'llama ?B Q4_1'."""
        return self._description

    def offload_summary(self) -> str:
        """Where the layers went, e.g. '31/31 layers on CUDA0' or 'CPU only'."""
        return self._offload_summary

    def stats(self) -> EngineStats:
        """The engine's load and counters now. Cheap (no call into the engine thread): /health and the
        metrics gauges read it on every request and scrape."""
        s = self.scheduler
        return EngineStats(active_sequences=s.active_count, queue_depth=s.queue_depth, steps=s.steps,
                           decode_seconds=s.decode_seconds, drafted_tokens=s.drafted_tokens,
                           accepted_tokens=s.accepted_tokens)

    @property
    def failure(self) -> BaseException | None:
        """Why the decode loop died (every request after that fails with it), or None while it runs."""
        return self.scheduler.failure

    def _pick_template(self, name: str | None, path: str | Path | None) -> ChatTemplate:
        tok = self.tokenizer
        special = {"bos_token": tok.special_text(tok.bos) if tok.bos >= 0 else "",
                   "eos_token": tok.special_text(tok.eos) if tok.eos >= 0 else ""}
        if path:
            return ChatTemplate.from_file(path, **special)
        if name:
            return ChatTemplate.builtin(name, **special)
        source = self.model.info.chat_template
        if source:
            try:
                return ChatTemplate(source, name="gguf", **special)
            except TemplateError as exc:
                log.warning("%s; falling back to chatml", exc)
        elif self.model.info.get(f"{self.model.info.architecture}.attention.causal", True):
            # (An encoder such as BERT has none and never chats: nothing to warn about.)
            log.warning("%s has no chat template; using chatml", self.model_name)
        return ChatTemplate.builtin("chatml", **special)

    # Tokens.
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int], *, param: str = "tokens") -> str:
        """Ids from anywhere (a client's too): an id outside the vocabulary is an InvalidParameter
        naming `param`."""
        return self.tokenizer.detokenize(tokens, param)

    def token_pieces(self, ids: list[int], *, special: bool = False) -> list[bytes]:
        """Each token's raw bytes (OpenAI's logprobs `bytes` and `token`): a piece may be part of a
        character. Control tokens (end-of-turn, ...) give b'' as in the generated text, or their text
        with `special`. Ids from anywhere: one outside the vocabulary is an InvalidParameter."""
        tok = self.tokenizer
        tok.check_ids(ids, "tokens")
        if special:
            pieces = tok.special_pieces()
            return [pieces[t] for t in ids]
        return [tok.piece(t) for t in ids]

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        return "".join(s.text for s in self._segments(messages, add_generation_prompt, tools, template_kwargs))

    def chat_tokens(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Template text is tokenized with special tokens parsed; message content never is.

        `tools` reaches the template as its `tools` variable (undefined when None, as before);
        `template_kwargs` are further template variables (a request's chat_template_kwargs)."""
        # Content and the template text around it are tokenized as one run, as llama.cpp tokenizes a
        # whole prompt (the same ids as llama-server); only template text makes control tokens.
        start = [self.tokenizer.bos] if self.tokenizer.add_bos else []
        return start + tokenize_segments(self._segments(messages, add_generation_prompt, tools, template_kwargs),
                                         self.tokenizer)

    def _segments(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                  tools: list[dict[str, Any]] | None = None,
                  template_kwargs: dict[str, Any] | None = None) -> list[Segment]:
        extra = dict(template_kwargs or {})
        clash = sorted(k for k in extra if not isinstance(k, str) or k in _TEMPLATE_OWN)
        if clash:
            raise InvalidParameter(f"chat template variables cannot be set by a request: {clash}",
                                   param="chat_template_kwargs")
        if tools is not None:
            extra["tools"] = tools
        segments = self.template.render_segments(messages, add_generation_prompt=add_generation_prompt, **extra)
        bos = self.template.bos_token
        # The tokenizer adds BOS itself when the model asks for it; don't let the template add a second.
        if self.tokenizer.add_bos and bos and segments and not segments[0].is_content \
                and segments[0].text.startswith(bos):
            segments[0] = Segment(segments[0].text[len(bos):], False)
        return [s for s in segments if s.text]

    # Requests.
    def _check(self, request: GenerationRequest) -> None:
        if not self.generates:
            raise InvalidParameter(f"{self.model_name} is an embedding model: it cannot generate text; use "
                                   "/v1/embeddings or `ggufchat embed`", param="model")
        if not request.prompt_tokens:
            raise InvalidParameter("the prompt is empty", param="prompt")
        if request.max_tokens is not None and request.max_tokens < 0:
            raise InvalidParameter("max_tokens must be at least 0", param="max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(request, name)
            if n is not None and not 0 <= n <= MAX_TOP:
                raise InvalidParameter(f"{name} must be between 0 and {MAX_TOP}, not {n!r}", param=name)
        sampling = request.sampling
        sampling.validate()
        # Leave room for at least one generated token, unless none is asked for.
        room = self.n_ctx_seq if request.max_tokens == 0 else self.n_ctx_seq - 1
        if len(request.prompt_tokens) > room:
            raise ContextOverflow(len(request.prompt_tokens), self.n_ctx_seq)
        self.tokenizer.check_ids(request.prompt_tokens, "prompt")
        if sampling.grammar is not None:
            try:
                gbnf.check(sampling.grammar, self.grammar_limits)
            except InvalidParameter as exc:
                if exc.param == sampling.grammar_param:
                    raise
                message = str(exc).replace(f"this {gbnf.PARAM}", f"this request's {sampling.grammar_param}")
                raise InvalidParameter(message, param=sampling.grammar_param, hint=exc.hint) from exc

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Check a request and build its sampler (any thread; a grammar can take a while to compile)."""
        self._check(request)
        sampler = make_sampler(
            request.sampling,
            n_vocab=self.tokenizer.n_vocab,
            n_ctx_seq=self.n_ctx_seq,
            default_seed=self.options.seed,
            banned_tokens=self.tokenizer.eog_tokens() if request.ignore_eos else None,
            vocab=self.model.vocab,
            history=request.prompt_tokens,
            tokenizer=self.tokenizer,
        )
        # Speculation keeps greedy output exact by comparing the model's argmax with the draft: only
        # plain greedy requests (ArgmaxSampler: no temperature, grammar or penalties) draft.
        drafter = None
        if request.speculative and isinstance(sampler, ArgmaxSampler) and request.max_tokens != 0:
            if self.options.spec == "ngram":
                drafter = NgramDrafter(request.prompt_tokens, self.scheduler.ngram_pool, ends=self.scheduler.eog)
            elif self.options.spec == "draft":
                drafter = DraftState()
        return Prepared(request, sampler, drafter)

    def _sequence(self, request: GenerationRequest | Prepared, emit) -> Sequence:
        prepared = request if isinstance(request, Prepared) else self.prepare(request)
        req = prepared.request
        seq = Sequence(req, emit, Usage(prompt_tokens=len(req.prompt_tokens), t_submit=time.perf_counter()),
                       sampler=prepared.take_sampler(), drafter=prepared.drafter)
        try:
            self.scheduler.submit(seq)
        except BaseException:
            seq.sampler.free()
            raise
        return seq

    def submit(self, request: GenerationRequest | Prepared) -> Stream:
        events: queue.SimpleQueue = queue.SimpleQueue()
        return Stream(self, self._sequence(request, events.put), events)

    def submit_async(self, request: GenerationRequest | Prepared) -> AsyncStream:
        """Submit from inside a running event loop; events arrive on that loop. Prepare big requests
        first (on another thread): unprepared ones are checked and compiled on this one."""
        events: asyncio.Queue = asyncio.Queue()
        seq = self._sequence(request, LoopEmitter(asyncio.get_running_loop(), events))
        return AsyncStream(self, seq, events)

    # Embeddings (engine/embeddings.py): a second context on this model, run on the engine thread.
    def embedding_spec(self) -> EmbeddingSpec:
        """Pooling, size and input limit of this model's embeddings; InvalidParameter for a reranker."""
        return self._embeddings().spec

    def embed(self, inputs: list[EmbeddingInput], *, dimensions: int | None = None,
              stop: threading.Event | None = None, truncate: bool = False) -> Embeddings:
        """L2-normalised vectors and token counts for texts and/or token lists; blocks (call it off the
        event loop). Many inputs are decoded together; setting `stop` ends it between two batches. A text
        longer than the model takes is refused, or with `truncate` cut to its start (Ollama's default)."""
        return self._embeddings().embed(inputs, dimensions=dimensions, stop=stop, truncate=truncate)

    def _embeddings(self) -> Embedder:
        with self._embedder_lock:
            if self._closed:
                raise EngineStopped("the engine was closed")
            if self._embedder is None:
                spec = spec_for(self.model, self.n_ctx_seq)
                self._embedder = Embedder(self.model, self.tokenizer, spec, self.scheduler.call,
                                          self._thread.is_alive)
            return self._embedder

    def clear_cache(self) -> None:
        """Forget the KV kept for prefix reuse (idle sequences only); returns once it is done."""
        self.scheduler.call(self.scheduler.forget_cached).wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.close()
            self._thread.join()
            if self.scheduler.draft_model is not None:
                self.scheduler.draft_model.close()
            with self._embedder_lock:
                if self._embedder is not None:
                    self._embedder.close()
            self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
