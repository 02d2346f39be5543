"""Load a GGUF model and create its llama.cpp context from llama.cpp-style options."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from ggufchat.engine.backend import BACKEND
from ggufchat.engine.devices import Device, list_devices
from ggufchat.engine.fit import Fit, fit_layers, memory_bytes, model_sizes, weight_bytes
from ggufchat.errors import InvalidModelFile, InvalidParameter, ModelLoadError, ModelNotFound
from ggufchat.machine import available_cpus
from ggufchat.models.gguf import GGUFInfo, ggml_type, read_gguf

# The KV cache types llama.cpp accepts (-ctk / -ctv); their ids come from the one ggml type table.
KV_TYPES = {name: ggml_type(name)[0] for name in
            ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
DEFAULT_CTX_PER_SEQ = 4096
SPEC_TYPES = ("none", "ngram", "draft")  # --spec: speculative decoding (speculative.py, draft_model.py)
# The longest drafts by default. A draft model pays a pass per drafted token, and its acceptance falls
# with every token, so long drafts rarely pay (llama.cpp's --draft-max default). An n-gram draft costs
# nothing to make, and a copy that goes back far goes on far: llama.cpp's ngram-simple drafts up to 48.
DRAFT_MODEL_MAX = 16
NGRAM_DRAFT_MAX = 48
logger = logging.getLogger(__name__)


def default_threads() -> int:
    n = available_cpus()
    # Decode is memory-bound: past the physical cores, SMT siblings only add contention, and on
    # big machines the logical count is nearly always twice the physical one.
    return n // 2 if n >= 8 else n


@dataclass
class LoadOptions:
    """Everything that fixes a loaded model and its context. Flag names follow llama.cpp."""

    model_path: Path
    n_gpu_layers: str | int = "auto"  # number, "auto" or "all"
    flash_attn: str = "auto"  # on / off / auto
    n_ctx: int = 0  # total over all sequences; 0 = min(train ctx, 4096) per sequence
    n_threads: int = 0  # 0 = default_threads()
    n_threads_batch: int = 0  # 0 = n_threads
    n_batch: int = 2048
    n_ubatch: int = 512
    n_seq_max: int = 1
    seed: int | None = None  # default sampling seed for requests that give none
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    split_mode: str = "layer"
    tensor_split: list[float] = field(default_factory=list)
    main_gpu: int = 0
    rpc_servers: list[str] = field(default_factory=list)  # host:port of `ggufchat rpc-worker`s
    use_mmap: bool = True
    # Speculative decoding for greedy requests: none, ngram (prompt lookup) or draft; auto (the command
    # line's default) is draft with a draft model, else ngram.
    spec: str = "none"
    model_draft: Path | None = None  # -md: the draft model for --spec draft (implies it)
    # The longest draft (None: DRAFT_MODEL_MAX with a draft model, NGRAM_DRAFT_MAX for n-gram drafts); the
    # engine picks shorter ones where they pay better.
    draft_max: int | None = None
    draft_min: int = 0  # drafts shorter than this are not verified
    n_gpu_layers_draft: str | int = "auto"  # -ngld

    def longest_draft(self) -> int:
        if self.draft_max is not None:
            return self.draft_max
        return DRAFT_MODEL_MAX if self.spec == "draft" else NGRAM_DRAFT_MAX

    def validate(self) -> None:
        if self.n_seq_max < 1 or self.n_seq_max > 256:
            raise InvalidParameter("parallel sequences must be between 1 and 256", param="n_seq_max")
        if self.n_ctx < 0:
            raise InvalidParameter("--ctx-size must be 0 (model default) or positive", param="n_ctx")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidParameter("--batch-size and --ubatch-size must be positive", param="n_batch")
        if self.n_threads < 0:
            raise InvalidParameter("--threads must be positive", param="n_threads")
        if self.flash_attn not in FLASH_ATTN:
            raise InvalidParameter(
                f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, not {self.flash_attn!r}",
                param="flash_attn",
            )
        for name, value in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if value not in KV_TYPES:
                raise InvalidParameter(f"{name} must be one of {', '.join(KV_TYPES)}, not {value!r}")
        if self.spec == "auto":
            self.spec = "draft" if self.model_draft is not None else "ngram"
        if self.spec not in SPEC_TYPES:
            raise InvalidParameter(f"--spec must be one of {', '.join(SPEC_TYPES)} or auto, not {self.spec!r}",
                                   param="spec")
        if self.model_draft is not None and self.spec == "none":
            self.spec = "draft"  # -md alone means draft with it, as in llama.cpp
        if self.spec == "draft" and self.model_draft is None:
            raise InvalidParameter("--spec draft needs a draft model: -md/--model-draft PATH", param="model_draft")
        if self.model_draft is not None and self.spec != "draft":
            raise InvalidParameter(f"-md/--model-draft is for --spec draft, not --spec {self.spec}",
                                   param="model_draft")
        if self.draft_max is not None and not 1 <= self.draft_max <= 64:
            raise InvalidParameter("--draft-max must be between 1 and 64", param="draft_max")
        if not 0 <= self.draft_min <= self.longest_draft():
            raise InvalidParameter("--draft-min must be between 0 and --draft-max", param="draft_min")
        parse_gpu_layers(self.n_gpu_layers_draft)
        if self.split_mode not in SPLIT_MODES:
            raise InvalidParameter(f"--split-mode must be one of {', '.join(SPLIT_MODES)}")
        parse_gpu_layers(self.n_gpu_layers)


def context_size(options: LoadOptions, info: GGUFInfo) -> int:
    """The context over all sequences: -c, or the model's training context capped at
    DEFAULT_CTX_PER_SEQ for each sequence. One source (the GGUF header) for the fit, the context and
    the memory estimate."""
    per_seq = min(info.context_length or DEFAULT_CTX_PER_SEQ, DEFAULT_CTX_PER_SEQ)
    return options.n_ctx or per_seq * options.n_seq_max


def estimate_memory(options: LoadOptions) -> int:
    """Bytes the model will hold once loaded with these options, the draft model's included (reads the
    GGUF headers: blocking)."""
    total = 0
    for path in filter(None, (options.model_path, options.model_draft)):
        info = read_gguf(Path(path))
        total += memory_bytes(model_sizes(info), weight_bytes(info), n_ctx=context_size(options, info),
                              n_ubatch=min(options.n_ubatch, options.n_batch), n_seq=options.n_seq_max,
                              flash_attn=options.flash_attn != "off", cache_type_k=options.cache_type_k,
                              cache_type_v=options.cache_type_v)
    return total


def parse_gpu_layers(value: str | int) -> int | str:
    """Normalise -ngl: an int >= 0, "all", or "auto"."""
    if isinstance(value, int):
        if value < 0:
            return "all"
        return value
    text = str(value).strip().lower()
    if text in ("auto", "all"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise InvalidParameter(
            f"--n-gpu-layers must be a number, 'auto' or 'all', not {value!r}", param="n_gpu_layers"
        ) from None
    return "all" if n < 0 else n


def resolve_gpu_layers(value: str | int, n_offload_devices: int, fit=None) -> int:
    """The n_gpu_layers llama.cpp gets. With no device to offload to, 0 whatever was asked; "auto"
    takes what `fit` (engine/fit.py) found fits the devices' free memory."""
    parsed = parse_gpu_layers(value)
    if n_offload_devices == 0:
        return 0
    if parsed == "all":
        return -1
    if parsed == "auto":
        return fit.n_gpu_layers if fit else -1
    return int(parsed)


def parse_tensor_split(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        parts = [float(p) for p in text.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise InvalidParameter(
            f"--tensor-split takes proportions like 3,1, not {text!r}", param="tensor_split"
        ) from None
    if any(p < 0 for p in parts) or not any(parts):
        raise InvalidParameter("--tensor-split needs non-negative proportions, not all zero")
    return parts


class LoadedModel:
    """A llama.cpp model and one context over it. Owned by one engine thread once handed over."""

    def __init__(self, options: LoadOptions) -> None:
        options.validate()
        self.options = options
        self.path = Path(options.model_path)
        if not self.path.is_file():
            raise ModelNotFound(f"no model file at {self.path}")
        # Parse the header ourselves first: llama.cpp aborts the process on some malformed files.
        self.info: GGUFInfo = read_gguf(self.path)
        BACKEND.ensure_ready()
        BACKEND.log.take_recent()  # warnings of earlier loads are not this one's
        self._tensor_split = None
        self.model = self._load_model()
        try:
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.ctx = self._new_context()
        except BaseException:
            llama_cpp.llama_model_free(self.model)
            raise
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self.ctx)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_batch = options.n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def _load_model(self):
        o = self.options
        params = llama_cpp.llama_model_default_params()
        offload = self._offload_devices()
        self.offload_devices = [f"{d.name} {d.description}" if d.remote else d.name for d in offload]
        self.fit = self._fit(offload) if parse_gpu_layers(o.n_gpu_layers) == "auto" and offload else None
        params.n_gpu_layers = self.n_gpu_layers = resolve_gpu_layers(o.n_gpu_layers, len(offload), self.fit)
        if BACKEND.has_rpc_devices:
            # RPC devices stay in ggml's registry for the process's life: name this load's devices so a
            # later load without --rpc (or with other workers) does not pick them up.
            arr = (ctypes.c_void_p * (len(offload) + 1))(*[d.handle for d in offload], None)
            self._devices = arr
            params.devices = ctypes.cast(arr, ctypes.c_void_p).value
        params.split_mode = SPLIT_MODES[o.split_mode]
        params.main_gpu = o.main_gpu
        params.use_mmap = o.use_mmap
        if o.tensor_split:
            n_max = llama_cpp.llama_max_devices()
            if len(o.tensor_split) > n_max:
                raise InvalidParameter(f"--tensor-split names {len(o.tensor_split)} devices; at most {n_max}")
            arr = (ctypes.c_float * n_max)(*o.tensor_split)
            self._tensor_split = arr  # llama.cpp reads it during the load; keep it alive
            params.tensor_split = arr
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise _load_failure(f"llama.cpp could not load {self.path}", InvalidModelFile)
        return model

    def _offload_devices(self) -> list[Device]:
        """Where layers can go, in llama.cpp's default order: RPC workers first, then this machine's
        GPUs (integrated ones only when there is no discrete one)."""
        wanted = BACKEND.connect_rpc(self.options.rpc_servers)
        devices = list_devices(remote=wanted)
        by_handle = {d.handle: d for d in devices}
        workers = [by_handle[h] for h in wanted]
        local = [d for d in devices if not d.remote]
        gpus = [d for d in local if d.kind == "gpu"] or [d for d in local if d.kind == "igpu"]
        return workers + gpus

    def _fit(self, offload: list[Device]) -> Fit:
        o = self.options
        fit = fit_layers(model_sizes(self.info), [d.free_bytes for d in offload], n_ctx=self._n_ctx(),
                         n_ubatch=min(o.n_ubatch, o.n_batch), n_seq=o.n_seq_max, flash_attn=o.flash_attn != "off",
                         cache_type_k=o.cache_type_k, cache_type_v=o.cache_type_v)
        logger.info(fit.summary)
        return fit

    def _n_ctx(self) -> int:
        return context_size(self.options, self.info)

    def _new_context(self):
        o = self.options
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self._n_ctx()
        params.n_batch = o.n_batch
        params.n_ubatch = min(o.n_ubatch, o.n_batch)
        params.n_seq_max = o.n_seq_max
        threads = o.n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = o.n_threads_batch or threads
        params.flash_attn_type = FLASH_ATTN[o.flash_attn]
        params.type_k = KV_TYPES[o.cache_type_k]
        params.type_v = KV_TYPES[o.cache_type_v]
        # A KV stream per sequence: what makes "batched greedy == sequential greedy" hold (DESIGN.md).
        params.kv_unified = False
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise _load_failure("llama.cpp could not create a context", ModelLoadError,
                                hint="Lower -c/--ctx-size or -np, or use a quantized KV cache (-ctk q8_0).")
        return ctx

    def offload_summary(self) -> str:
        """Where the layers went, e.g. '31/31 layers on CUDA0' or 'CPU only'."""
        total = llama_cpp.llama_model_n_layer(self.model) + 1  # llama.cpp counts the output head as one
        on = total if self.n_gpu_layers < 0 else min(self.n_gpu_layers, total)
        if not self.offload_devices or on == 0:
            return "CPU only"
        return f"{on}/{total} layers on {', '.join(self.offload_devices)}"

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None


def _load_failure(message: str, kind: type, hint: str | None = None):
    detail = [line for line in BACKEND.log.take_recent() if line]
    if detail:
        message += ": " + "; ".join(detail[-3:])
    return kind(message, hint=hint) if hint else kind(message)
