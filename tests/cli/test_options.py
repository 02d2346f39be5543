"""The engine options: declared once in cli/options.py, the same flags on every verb that loads a model."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from ggufchat.cli import options as o
from ggufchat.cli.main import _register, app
from ggufchat.engine.loader import LoadOptions
from ggufchat.errors import InvalidParameter
from ggufchat.models.embedded import embedded_model_path
from tests.conftest import run_cli

# What bench decides itself (see cli/bench.py); every other declared option it offers like chat and serve.
BENCH_OMITS = {"n_ctx", "seed", "chat_template", "chat_template_file"}


def _commands():
    _register()
    return typer.main.get_command(app).commands


def _engine_params(name: str) -> dict[str, dict]:
    """The declared options a command offers: their flags, default, help and panel, as click has them."""
    return {p.name: {"opts": (*p.opts, *p.secondary_opts), "default": p.default, "help": getattr(p, "help", None),
                     "panel": getattr(p, "rich_help_panel", None), "envvar": getattr(p, "envvar", None)}
            for p in _commands()[name].params if p.name in o.BY_NAME}


def test_chat_serve_and_bench_share_the_engine_flags():
    chat, serve, bench = (_engine_params(name) for name in ("chat", "serve", "bench"))
    assert set(chat) == set(o.BY_NAME)
    # serve takes several MODELs (server with several models); every other engine flag is chat's
    assert serve == {name: chat[name] for name in chat if name != "model_arg"}
    assert [p.name for p in _commands()["serve"].params if p.name == "models"] == ["models"]
    assert set(bench) == set(chat) - BENCH_OMITS
    # bench measures the engine as llama-bench does: no speculation unless asked for
    assert chat["spec"]["default"] == "auto" and bench["spec"]["default"] == "none"
    assert {**bench, "spec": chat["spec"]} == {name: chat[name] for name in bench}
    flags = {flag for param in bench.values() for flag in param["opts"]}
    assert {"-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "--rpc"} <= flags


def test_each_flag_is_declared_once():
    flags = [flag for option in o.ENGINE_OPTIONS if not option.argument for flag in option.flags]
    assert len(flags) == len(set(flags))


def test_bench_help_lists_the_multi_gpu_flags():
    result = run_cli("bench", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for flag in ("--split-mode", "-sm", "--tensor-split", "-ts", "--main-gpu", "-mg", "--rpc"):
        assert flag in result.stdout
    assert "--ctx-size" not in result.stdout  # bench sizes the context itself


def test_load_options_fields_exist_and_defaults_match_the_engine():
    fields = {f.name: f for f in dataclasses.fields(LoadOptions)}
    for option in o.ENGINE_OPTIONS:
        if option.target != "load":
            continue
        field = fields[option.name]
        engine_default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if option.name == "spec":
            # The one exception: the command line speculates by default, the library only when asked.
            assert (option.default, engine_default) == ("auto", "none")
            continue
        # A flag left alone loads the model exactly as the engine's own default would.
        assert option.parse(option.default) == engine_default, option.name


def _flags(command: str, args: list[str]) -> o.EngineFlags:
    ctx = _commands()[command].make_context(command, args)
    return o.EngineFlags({k: v for k, v in ctx.params.items() if k in o.BY_NAME})


def test_flags_become_load_options():
    flags = _flags("chat", ["-ngl", "all", "-fa", "ON", "-c", "256", "-t", "2", "-b", "64", "-ub", "32",
                            "-ctk", "Q8_0", "-ctv", "q4_0", "-sm", "ROW", "-ts", "3,1", "-mg", "1",
                            "--rpc", "10.0.0.2:50052", "-s", "7", "--chat-template", "chatml"])
    load = flags.load_options()
    assert load == LoadOptions(model_path=embedded_model_path(), n_gpu_layers="all", flash_attn="on", n_ctx=256,
                               n_threads=2, n_batch=64, n_ubatch=32, seed=7, cache_type_k="q8_0",
                               cache_type_v="q4_0", split_mode="row", tensor_split=[3.0, 1.0], main_gpu=1,
                               rpc_servers=["10.0.0.2:50052"], spec="ngram")
    assert flags.engine_kwargs() == {"chat_template": "chatml", "chat_template_file": None}
    assert flags.seed == 7


def test_serve_sets_the_sequences_and_bench_its_fixed_fields():
    assert _flags("serve", ["-np", "3"]).load_options(n_seq_max=3).n_seq_max == 3
    load = _flags("bench", ["-sm", "none", "-mg", "1"]).load_options(seed=0, n_seq_max=8)
    assert (load.split_mode, load.main_gpu, load.seed, load.n_seq_max) == ("none", 1, 0, 8)
    with pytest.raises(TypeError):  # a verb may not silently override a flag the user could give
        _flags("chat", []).load_options(seed=0)


def test_bad_values_are_reported_by_their_flag():
    with pytest.raises(InvalidParameter, match="--n-gpu-layers"):
        _flags("bench", ["-ngl", "many"]).load_options(seed=0)
    with pytest.raises(InvalidParameter, match="--split-mode"):
        _flags("bench", ["-sm", "diagonal"]).load_options(seed=0)


def test_model_argument_and_option_must_agree():
    assert _flags("chat", ["x.gguf"]).model == "x.gguf"
    assert _flags("chat", ["-m", "x.gguf"]).model == "x.gguf"
    with pytest.raises(typer.BadParameter):
        _ = _flags("chat", ["x.gguf", "-m", "y.gguf"]).model
