"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ggufchat.engine import EngineStats

# The *_created series (a timestamp per counter) only double the page; Prometheus does not need them.
# prometheus_client has no per-registry option for this: the switch is one module-level flag, read
# whenever any registry is collected. So it is thrown once, here, where its process-wide reach is
# visible, rather than on every Metrics() as if it were per app.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's families. Everything about a model carries the label `model` (its name as requests
    give it), so a server holding several models reports each apart; `requests` and `draining` are the
    server's own. Routes and the generation code reach a model's series through `ModelMetrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m = ["model"]
        self.requests = Counter("ggufchat_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        # The autoscaling signals (docs/deploy.md): queue depth against slots, per replica.
        self.queue_depth = Gauge("ggufchat_queue_depth", "Sequences waiting for a free slot (autoscaling "
                                 "signal: scale up while it stays above 0).", m, registry=r)
        self.active = Gauge("ggufchat_active_sequences", "Sequences being decoded (autoscaling signal: "
                            "busy slots).", m, registry=r)
        self.slots = Gauge("ggufchat_slots", "Sequences decoded together (-np): the model's capacity.",
                           m, registry=r)
        self.admitted = Gauge("ggufchat_sequences_admitted", "Sequences admitted and not finished: queued, "
                              "being prepared or decoded (429 once it reaches slots + --max-queue).",
                              m, registry=r)
        self.draining = Gauge("ggufchat_draining", "1 after SIGTERM, while the requests in flight finish.",
                              registry=r)
        self.steps = Gauge("ggufchat_engine_steps", "Batches decoded since the model was loaded.", m, registry=r)
        self.decode_seconds = Gauge("ggufchat_engine_decode_seconds", "Time spent in llama_decode since the "
                                    "model was loaded.", m, registry=r)
        self.model_loaded = Gauge("ggufchat_model_loaded", "1 while the model is in memory.", m, registry=r)
        self.model_memory = Gauge("ggufchat_model_memory_bytes", "Estimated memory of the model while it is "
                                  "loaded (weights, KV cache, compute buffers): what the budget counts.",
                                  m, registry=r)
        self.model_loads = Counter("ggufchat_model_loads", "Times the model was loaded.", m, registry=r)
        self.model_unloads = Counter("ggufchat_model_unloads", "Times the model was unloaded, by why: idle "
                                     "(keep_alive or --idle-unload ran out) or evicted (room for another).",
                                     ["model", "why"], registry=r)
        self.prompt_tokens = Counter("ggufchat_prompt_tokens", "Prompt tokens of finished sequences.",
                                     m, registry=r)
        self.cached_tokens = Counter("ggufchat_prompt_tokens_cached",
                                     "Prompt tokens whose KV was reused, not recomputed.", m, registry=r)
        self.generated_tokens = Counter("ggufchat_generated_tokens", "Tokens generated.", m, registry=r)
        self.draft_tokens = Counter("ggufchat_draft_tokens", "Speculation: tokens drafted and verified.",
                                    m, registry=r)
        self.draft_accepted = Counter("ggufchat_draft_accepted_tokens",
                                      "Speculation: drafted tokens the model agreed with.", m, registry=r)
        self.finished = Counter("ggufchat_sequences_finished", "Sequences by finish reason.", ["model", "reason"],
                                registry=r)
        self.cancelled = Counter("ggufchat_sequences_cancelled",
                                 "Sequences cancelled by the server: client disconnect or timeout.",
                                 ["model", "why"], registry=r)
        self.rejected = Counter("ggufchat_requests_rejected", "Requests refused because the queue was full.",
                                m, registry=r)
        self.ttft = Histogram("ggufchat_time_to_first_token_seconds", "Request arrival to first token.",
                              m, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ggufchat_inter_token_latency_seconds", "Time between a sequence's tokens.",
                             m, buckets=_LATENCY_BUCKETS, registry=r)
        self.models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        """The series of one model (made once per name)."""
        if name not in self.models:
            self.models[name] = ModelMetrics(self, name)
        return self.models[name]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's children of the families, under the families' own names: code that records for a
    model needs no label in hand. Label-valued families (finished, cancelled, unloads) take the second
    label as Prometheus' `labels()` would."""

    _PLAIN = ("queue_depth", "active", "slots", "admitted", "steps", "decode_seconds", "model_loaded",
              "model_memory", "model_loads", "prompt_tokens", "cached_tokens", "generated_tokens",
              "draft_tokens", "draft_accepted", "rejected", "ttft", "itl")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        for attr in self._PLAIN:
            setattr(self, attr, getattr(metrics, attr).labels(model=name))
        self.finished = _Bound(metrics.finished, name)
        self.cancelled = _Bound(metrics.cancelled, name)
        self.unloads = _Bound(metrics.model_unloads, name)

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Read gauges from the engine at scrape time, not on every step."""
        self.queue_depth.set_function(lambda: stats().queue_depth)
        self.active.set_function(lambda: stats().active_sequences)
        self.steps.set_function(lambda: stats().steps)
        self.decode_seconds.set_function(lambda: stats().decode_seconds)


class _Bound:
    def __init__(self, family, model: str) -> None:
        self.family = family
        self.model = model

    def labels(self, value: str):
        return self.family.labels(self.model, value)
