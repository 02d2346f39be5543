"""`-ngl auto`: how many layers fit the free memory of the offload devices, with the context asked for.

llama.cpp's own fitting (common/fit.cpp) lives in its `common` library, which llama-cpp-python does
not ship, and the memory breakdown it relies on is a C++-only API. So this estimates from the GGUF
header instead: the weights of each layer, its share of the KV cache for the requested context and
KV types, and a compute buffer, against each device's free memory less a margin (1 GiB, llama.cpp's
default `--fit-target`). llama.cpp offloads from the top: -ngl k puts the output layer and the last
k-1 repeating layers on the devices, so the fit adds layers in that order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ggufchat.models.catalog import split_info, split_names
from ggufchat.models.gguf import GGUFInfo, TensorInfo, ggml_type, read_gguf

MARGIN_BYTES = 1 << 30
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class ModelSizes:
    n_layer: int
    layer_bytes: list[int]  # weights of each repeating layer
    output_bytes: int  # output head (the token embeddings again when the model ties them)
    kv_bytes_per_cell: list[int]  # per layer, one context cell (K + V), at f16
    n_embd: int
    n_ff: int
    n_vocab: int
    n_head: int


@dataclass
class Fit:
    n_gpu_layers: int  # what llama.cpp gets: n_layer + 1 means everything
    n_layer: int
    need_all_bytes: int  # to offload everything
    free_bytes: int  # usable on the devices, after margins and compute buffers

    @property
    def summary(self) -> str:
        on = min(self.n_gpu_layers, self.n_layer + 1)
        gib = 1 << 30
        return (f"-ngl auto: {on}/{self.n_layer + 1} layers offloaded "
                f"(all would need {self.need_all_bytes / gib:.2f} GiB, {self.free_bytes / gib:.2f} GiB usable)")


def _tensors(info: GGUFInfo) -> list[TensorInfo]:
    """All tensors, reading the other parts' headers when the model is split."""
    split = split_info(Path(info.path).name)
    if not split or split[1] != 1:
        return list(info.tensors)
    tensors = list(info.tensors)
    for name in split_names(Path(info.path).name)[1:]:
        tensors.extend(read_gguf(Path(info.path).with_name(name), check_bounds=False).tensors)
    return tensors


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list) and value:
        return [int(v) for v in value][:n_layer] + [int(value[-1])] * max(0, n_layer - len(value))
    return [int(value or 0)] * n_layer


def model_sizes(info: GGUFInfo) -> ModelSizes:
    arch = info.architecture or ""
    get = lambda key, default=None: info.get(f"{arch}.{key}", default)  # noqa: E731
    n_layer = int(get("block_count", 0))
    n_embd = int(get("embedding_length", 0))
    n_head = _per_layer(get("attention.head_count", 0), n_layer)
    n_head_kv = _per_layer(get("attention.head_count_kv", get("attention.head_count", 0)), n_layer)
    layer_bytes = [0] * n_layer
    output = embeddings = 0
    n_vocab = 0
    for t in _tensors(info):
        size = t.nbytes or 0
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += size
        elif t.name.startswith("output.") or t.name == "output_norm.weight":
            output += size
            if t.name == "output.weight":
                n_vocab = t.shape[-1]
        elif t.name == "token_embd.weight":
            embeddings = size
            n_vocab = n_vocab or t.shape[-1]
    if not any(t.name == "output.weight" for t in info.tensors):
        output += embeddings  # tied embeddings: the output head is a copy of them on the device
    kv = []
    for il in range(n_layer):
        head_dim_k = int(get("attention.key_length", 0) or (n_embd // n_head[il] if n_head[il] else 0))
        head_dim_v = int(get("attention.value_length", 0) or head_dim_k)
        kv.append(n_head_kv[il] * (head_dim_k + head_dim_v) * 2)
    n_ff = _per_layer(get("feed_forward_length", 0), max(n_layer, 1))
    return ModelSizes(n_layer, layer_bytes, output, kv, n_embd, max(n_ff), n_vocab, max(n_head, default=0))


def compute_bytes(sizes: ModelSizes, n_ubatch: int, *, with_output: bool, kq_cells: int = 0) -> int:
    """A rough bound on one device's compute buffer: the widest activations of a ubatch in f32, the
    attention scores when flash attention is off (kq_cells = context per sequence), and the logits
    on the device that holds the output head."""
    width = 4 * sizes.n_embd + 2 * sizes.n_ff + sizes.n_head * kq_cells + (sizes.n_vocab if with_output else 0)
    return n_ubatch * width * 4


def fit_layers(sizes: ModelSizes, free_bytes: list[int], *, n_ctx: int, n_ubatch: int, n_seq: int = 1,
               flash_attn: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16",
               margin: int = MARGIN_BYTES) -> Fit:
    """The largest -ngl whose weights, KV cache and compute buffers fit the devices' free memory."""
    # Bytes per element from the ggml type table (quantized: block bytes / block length); cells are f16 K+V.
    kv_scale = (ggml_type(cache_type_k)[1] + ggml_type(cache_type_v)[1]) / 4.0
    items = [int(b + kv * n_ctx * kv_scale) for b, kv in zip(sizes.layer_bytes, sizes.kv_bytes_per_cell, strict=True)]
    # Offload order: output head first, then repeating layers from the last one down.
    order = [sizes.output_bytes] + items[::-1]
    kq = 0 if flash_attn else n_ctx // max(1, n_seq)
    base = compute_bytes(sizes, n_ubatch, with_output=False, kq_cells=kq)
    logits = n_ubatch * sizes.n_vocab * 4  # on the one device holding the output head
    usable = max(0, sum(max(0, f - margin - base) for f in free_bytes) - logits)
    used, k = 0, 0
    for size in order:
        if used + size > usable:
            break
        used += size
        k += 1
    return Fit(n_gpu_layers=k, n_layer=sizes.n_layer, need_all_bytes=sum(order), free_bytes=usable)


def memory_bytes(sizes: ModelSizes, weights: int, *, n_ctx: int, n_ubatch: int, n_seq: int = 1,
                 flash_attn: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """What a loaded model holds, wherever it lives: its weights, the KV cache of its whole context, the
    compute buffer of one ubatch and the logits of one. For a server's budget of several models, so a
    bound rather than llama.cpp's exact allocation."""
    kv_scale = (ggml_type(cache_type_k)[1] + ggml_type(cache_type_v)[1]) / 4.0
    kv = int(sum(sizes.kv_bytes_per_cell) * n_ctx * kv_scale)
    kq = 0 if flash_attn else n_ctx // max(1, n_seq)
    return weights + kv + compute_bytes(sizes, n_ubatch, with_output=True, kq_cells=kq)


def weight_bytes(info: GGUFInfo) -> int:
    return sum(t.nbytes or 0 for t in _tensors(info))
