"""Command-line options shared by the verbs that load a model. Names follow llama.cpp's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ggufchat.engine.loader import LoadOptions, parse_gpu_layers, parse_tensor_split
from ggufchat.engine.sampling import SamplingParams
from ggufchat.errors import ModelNotFound
from ggufchat.models.catalog import looks_like_remote
from ggufchat.models.resolve import resolve_model
from ggufchat.settings import load_settings

_ENGINE = "Model and engine"
_SAMPLING = "Sampling"

ModelArg = Annotated[str | None, typer.Argument(metavar="MODEL",
    help="Model: a .gguf path, a cached model or alias (default: the embedded SmolLM2-135M).",
    show_default=False)]
Pull = Annotated[bool, typer.Option("--pull", help="Download the model first if it is not cached.",
                                    rich_help_panel=_ENGINE)]
ModelOpt = Annotated[str | None, typer.Option(
    "-m", "--model", help="Model .gguf path (same as the MODEL argument).", rich_help_panel=_ENGINE)]
GpuLayers = Annotated[str, typer.Option(
    "-ngl", "--n-gpu-layers", "--gpu-layers",
    help="Layers to offload to the GPU: a number, 'auto' or 'all'.", rich_help_panel=_ENGINE)]
FlashAttn = Annotated[str, typer.Option(
    "-fa", "--flash-attn",
    help="Flash attention: on, off or auto (a bare -fa means on).", rich_help_panel=_ENGINE)]
CtxSize = Annotated[int, typer.Option(
    "-c", "--ctx-size", help="Context size in tokens, over all sequences (0 = model default, at most 4096 per "
    "sequence).", rich_help_panel=_ENGINE)]
Threads = Annotated[int, typer.Option(
    "-t", "--threads", help="CPU threads (0 = one per physical core).", rich_help_panel=_ENGINE)]
BatchSize = Annotated[int, typer.Option(
    "-b", "--batch-size", help="Most tokens decoded in one step.", rich_help_panel=_ENGINE)]
UBatchSize = Annotated[int, typer.Option(
    "-ub", "--ubatch-size", help="Physical batch size.", rich_help_panel=_ENGINE)]
CacheTypeK = Annotated[str, typer.Option(
    "-ctk", "--cache-type-k", help="KV cache type for K (f16, q8_0, q4_0, ...).", rich_help_panel=_ENGINE)]
CacheTypeV = Annotated[str, typer.Option(
    "-ctv", "--cache-type-v", help="KV cache type for V (f16, q8_0, q4_0, ...).", rich_help_panel=_ENGINE)]
SplitMode = Annotated[str, typer.Option(
    "-sm", "--split-mode", help="Multi-GPU split: none, layer or row.", rich_help_panel=_ENGINE)]
TensorSplit = Annotated[str | None, typer.Option(
    "-ts", "--tensor-split", help="Share of the model per GPU, e.g. 3,1.", rich_help_panel=_ENGINE)]
MainGpu = Annotated[int, typer.Option(
    "-mg", "--main-gpu", help="GPU for the whole model (split none) or for intermediates (row).",
    rich_help_panel=_ENGINE)]
Rpc = Annotated[str | None, typer.Option(
    "--rpc", help="Split the model over `ggufchat rpc-worker`s: host:port[,host:port...]. The RPC protocol "
    "has no authentication: private networks only.", rich_help_panel=_ENGINE)]
ChatTemplateName = Annotated[str | None, typer.Option(
    "--chat-template", help="Built-in template instead of the model's: chatml, qwen, llama-3, llama-2, "
    "gemma, mistral, phi-3.", rich_help_panel=_ENGINE)]
ChatTemplateFile = Annotated[Path | None, typer.Option(
    "--chat-template-file", help="Jinja chat template file instead of the model's.", rich_help_panel=_ENGINE)]

Seed = Annotated[int | None, typer.Option("-s", "--seed", help="Sampling seed (default: random).",
                                             rich_help_panel=_SAMPLING)]
Temp = Annotated[float, typer.Option("--temp", "--temperature", help="Temperature; 0 = greedy.",
                                     rich_help_panel=_SAMPLING)]
TopK = Annotated[int, typer.Option("--top-k", help="Top-k (0 = off).", rich_help_panel=_SAMPLING)]
TopP = Annotated[float, typer.Option("--top-p", help="Top-p (1 = off).", rich_help_panel=_SAMPLING)]
MinP = Annotated[float, typer.Option("--min-p", help="Min-p (0 = off).", rich_help_panel=_SAMPLING)]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", help="Repeat penalty (1 = off).",
                                              rich_help_panel=_SAMPLING)]
RepeatLastN = Annotated[int, typer.Option("--repeat-last-n", help="Tokens the penalties look back on (-1 = "
                                          "context).", rich_help_panel=_SAMPLING)]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty", help="Presence penalty (0 = off).",
                                                rich_help_panel=_SAMPLING)]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty", help="Frequency penalty (0 = off).",
                                                 rich_help_panel=_SAMPLING)]


def load_options(*, model: str | None, n_gpu_layers: str, flash_attn: str, ctx_size: int, threads: int,
                 batch_size: int, ubatch_size: int, cache_type_k: str, cache_type_v: str, split_mode: str,
                 tensor_split: str | None, main_gpu: int, seed: int | None, n_seq_max: int = 1,
                 pull: bool = False, rpc: str | None = None) -> LoadOptions:
    from ggufchat.engine.rpc import parse_endpoints

    options = LoadOptions(
        model_path=_model_path(model, pull),
        n_gpu_layers=parse_gpu_layers(n_gpu_layers),
        flash_attn=flash_attn.lower(),
        n_ctx=ctx_size,
        n_threads=threads,
        n_batch=batch_size,
        n_ubatch=ubatch_size,
        n_seq_max=n_seq_max,
        seed=seed,
        cache_type_k=cache_type_k.lower(),
        cache_type_v=cache_type_v.lower(),
        split_mode=split_mode.lower(),
        tensor_split=parse_tensor_split(tensor_split),
        main_gpu=main_gpu,
        rpc_servers=parse_endpoints(rpc),
    )
    options.validate()
    return options


def _model_path(model: str | None, pull: bool):
    try:
        return resolve_model(model)
    except ModelNotFound:
        if not (pull and model and looks_like_remote(model)):
            raise
    import sys

    from ggufchat.models.hub import download

    return download(model, load_settings(), report=lambda line: print(line, file=sys.stderr)).path


def sampling_params(*, temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                    repeat_last_n: int, presence_penalty: float, frequency_penalty: float,
                    seed: int | None) -> SamplingParams:
    params = SamplingParams(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed,
    )
    params.validate()
    return params


def pick_model(argument: str | None, option: str | None) -> str | None:
    if argument and option and argument != option:
        raise typer.BadParameter("give the model either as MODEL or with -m, not both")
    return option or argument
