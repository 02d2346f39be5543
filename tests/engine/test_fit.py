"""`-ngl auto`: the memory estimate read from the GGUF header, and the fit against free memory.

The estimate is checked against what llama.cpp itself allocates in tests/cli/test_rpc.py (a load onto
two RPC workers prints its buffer sizes); here the arithmetic of the fit, on the real model's sizes.
"""

from __future__ import annotations

import pytest

from ggufchat.engine.fit import MARGIN_BYTES, compute_bytes, fit_layers, model_sizes
from ggufchat.engine.loader import LoadedModel, LoadOptions, resolve_gpu_layers
from ggufchat.models.gguf import read_gguf
from tests import backend_facts

MiB = 1 << 20


@pytest.fixture(scope="module")
def sizes(model_path):
    return model_sizes(read_gguf(model_path))


def test_sizes_of_the_embedded_model(sizes, model_path):
    info = read_gguf(model_path)
    assert sizes.n_layer == info.get("llama.block_count") == 30
    assert all(b == sizes.layer_bytes[0] for b in sizes.layer_bytes)
    # SmolLM2 ties its output head to the token embeddings: the head costs their size on a device.
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    norm = next(t for t in info.tensors if t.name == "output_norm.weight")
    assert sizes.output_bytes == embd.nbytes + norm.nbytes
    # Every tensor is either the input embeddings or counted once on the offload side.
    assert sum(sizes.layer_bytes) + sizes.output_bytes == sum(t.nbytes for t in info.tensors)
    # 3 KV heads of 64 dims, K and V, f16.
    assert sizes.kv_bytes_per_cell == [3 * 64 * 2 * 2] * 30
    assert (sizes.n_vocab, sizes.n_embd, sizes.n_head) == (49152, 576, 9)


def _budget(sizes, layers: int, n_ctx: int, n_ubatch: int = 512) -> int:
    """Free memory for exactly the output head plus `layers` repeating layers."""
    per_layer = sizes.layer_bytes[0] + sizes.kv_bytes_per_cell[0] * n_ctx
    return (MARGIN_BYTES + compute_bytes(sizes, n_ubatch, with_output=True) + sizes.output_bytes
            + layers * per_layer)


def test_everything_fits_in_plenty_of_memory(sizes):
    fit = fit_layers(sizes, [24 << 30], n_ctx=4096, n_ubatch=512)
    assert fit.n_gpu_layers == 31  # 30 layers + the output head: llama.cpp's "all"
    assert "31/31 layers" in fit.summary


def test_nothing_fits_below_the_margin(sizes):
    assert fit_layers(sizes, [MARGIN_BYTES // 2], n_ctx=4096, n_ubatch=512).n_gpu_layers == 0
    assert fit_layers(sizes, [], n_ctx=4096, n_ubatch=512).n_gpu_layers == 0


@pytest.mark.parametrize("layers", [0, 1, 7, 29])
def test_exact_budget_gives_that_many_layers(sizes, layers):
    fit = fit_layers(sizes, [_budget(sizes, layers, 4096)], n_ctx=4096, n_ubatch=512)
    assert fit.n_gpu_layers == 1 + layers
    fit = fit_layers(sizes, [_budget(sizes, layers, 4096) - 1], n_ctx=4096, n_ubatch=512)
    assert fit.n_gpu_layers == layers  # one byte short: one layer fewer


def test_a_longer_context_leaves_room_for_fewer_layers(sizes):
    free = [_budget(sizes, 10, 4096)]
    short = fit_layers(sizes, free, n_ctx=4096, n_ubatch=512).n_gpu_layers
    long = fit_layers(sizes, free, n_ctx=32768, n_ubatch=512).n_gpu_layers
    assert long < short == 11


def test_a_quantized_kv_cache_leaves_room_for_more_layers(sizes):
    free = [_budget(sizes, 10, 32768)]
    f16 = fit_layers(sizes, free, n_ctx=32768, n_ubatch=512).n_gpu_layers
    q8 = fit_layers(sizes, free, n_ctx=32768, n_ubatch=512, cache_type_k="q8_0", cache_type_v="q8_0").n_gpu_layers
    assert q8 > f16 == 11


def test_flash_attention_off_reserves_the_attention_scores(sizes):
    free = [_budget(sizes, 20, 4096)]
    on = fit_layers(sizes, free, n_ctx=4096, n_ubatch=512, flash_attn=True).n_gpu_layers
    off = fit_layers(sizes, free, n_ctx=4096, n_ubatch=512, flash_attn=False).n_gpu_layers
    assert off < on


def test_two_devices_pool_their_memory_less_a_margin_each(sizes):
    one = fit_layers(sizes, [_budget(sizes, 20, 4096)], n_ctx=4096, n_ubatch=512).n_gpu_layers
    half = _budget(sizes, 20, 4096) // 2
    two = fit_layers(sizes, [half, half], n_ctx=4096, n_ubatch=512).n_gpu_layers
    assert two < one  # the second device pays its own margin and compute buffer


def test_resolve_without_an_offload_device_is_zero():
    assert resolve_gpu_layers("auto", 0) == 0
    assert resolve_gpu_layers("all", 0) == 0
    assert resolve_gpu_layers(12, 0) == 0
    assert resolve_gpu_layers("all", 1) == -1
    assert resolve_gpu_layers(12, 2) == 12


def test_ngl_0_keeps_every_layer_on_the_cpu(model_path):
    """-ngl 0 is a CPU-only load on any machine: the GPUs are there to offload to, nothing goes."""
    model = LoadedModel(LoadOptions(model_path=model_path, n_ctx=512, n_gpu_layers=0))
    try:
        assert model.offload_devices == backend_facts.offload_names()  # [] without a GPU, ["CUDA0"] with one
        assert model.n_gpu_layers == 0 and model.fit is None  # no estimate when nothing is to be placed
        assert model.offload_summary() == "CPU only"
    finally:
        model.close()


def test_auto_load_summary_names_the_devices_present(model_path):
    model = LoadedModel(LoadOptions(model_path=model_path, n_ctx=512))
    try:
        gpus = backend_facts.offload_names()
        assert model.offload_devices == gpus
        if not gpus:  # nothing to offload to: no estimate, and llama.cpp gets 0 whatever -ngl said
            assert model.n_gpu_layers == 0 and model.fit is None
            assert model.offload_summary() == "CPU only"
        else:  # the estimate decides, and the summary says how much of it went where
            assert model.fit is not None and model.n_gpu_layers == model.fit.n_gpu_layers
            on = min(model.fit.n_gpu_layers, 31)
            expected = f"{on}/31 layers on {', '.join(gpus)}" if on else "CPU only"
            assert model.offload_summary() == expected
    finally:
        model.close()


def test_the_one_ggml_type_table_agrees_with_the_bindings():
    import llama_cpp

    from ggufchat.engine.loader import KV_TYPES

    for name, type_id in KV_TYPES.items():
        exported = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        assert exported is None or exported == type_id, name
    assert KV_TYPES["bf16"] == 30  # not exported by the bindings: ggml.h's GGML_TYPE_BF16
