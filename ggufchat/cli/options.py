"""Command-line options shared by the verbs that load a model. Names follow llama.cpp's flags.

Every engine and model option is declared once, in `ENGINE_OPTIONS`: the LoadOptions field (or Engine
keyword) it feeds, its flags, help, panel, environment variable if any, the parser that turns the
command-line text into the engine's value, and the default. `chat`, `serve` and `bench` get their engine
flags from that table through the `engine_options` decorator, so a new engine flag is one new row here
(and, if it is new to the engine, one LoadOptions field) instead of nine edits.

Why a decorator that rewrites the command's signature, rather than click parameters added by hand:
typer builds its click command from the function signature when the app runs, and renders help panels
(`rich_help_panel`) only for its own TyperOption/TyperArgument objects, which live in typer's vendored
copy of click. Hand-made click parameters would need that private copy and would lose the panels. So
the decorator turns each declaration into the same `Annotated[..., typer.Option(...)]` parameter a
hand-written signature would hold, splices them into the command's signature (typer honours
`__signature__`), and hands the command one `EngineFlags` object in place of the parameters. The
command never sees the individual values, so nothing can bypass the table.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ggufchat.engine.loader import LoadOptions, parse_gpu_layers, parse_tensor_split
from ggufchat.engine.sampling import SamplingParams
from ggufchat.errors import ModelNotFound
from ggufchat.models.catalog import looks_like_remote
from ggufchat.models.resolve import resolve_model
from ggufchat.settings import load_settings

_ENGINE = "Model and engine"
_SAMPLING = "Sampling"
_SPEC = "Speculative decoding"


def _same(value: Any) -> Any:
    return value


def _lower(value: str) -> str:
    return value.lower()


# --spec, and llama.cpp's --spec-type spellings: its n-gram modes are all one prompt-lookup drafter here.
_SPEC_ALIASES = {"none": "none", "ngram": "ngram", "ngram-simple": "ngram", "ngram-mod": "ngram",
                 "ngram-cache": "ngram", "draft": "draft", "draft-simple": "draft"}


def _spec(value: str) -> str:
    value = value.lower()
    return _SPEC_ALIASES.get(value, value)  # anything else: LoadOptions.validate names the choices


def _draft_model(name: str | None):
    """-md: a .gguf path or a cached model, like MODEL (but never the embedded default)."""
    return resolve_model(name) if name else None


def _rpc_endpoints(text: str | None) -> list[str]:
    # Imported when used: engine.rpc pulls in the device registry, which `--help` does not need.
    from ggufchat.engine.rpc import parse_endpoints

    return parse_endpoints(text)


@dataclass(frozen=True)
class EngineOption:
    """One engine or model option, as every verb that loads a model offers it."""

    name: str  # the LoadOptions field (target "load"), the Engine keyword ("engine"), or a CLI input ("cli")
    flags: tuple[str, ...]  # for an argument: its metavar
    type: Any  # the Python type typer parses the text into
    default: Any
    help: str
    target: Literal["load", "engine", "cli"] = "load"
    parse: Callable[[Any], Any] = _same  # command-line value -> the engine's value; raises InvalidParameter
    panel: str = _ENGINE
    envvar: str | None = None  # none today: engine options come from flags; GGUFCHAT_MODEL is a Settings field
    argument: bool = False  # a positional argument rather than an option
    leads: bool = False  # opens the command's signature (MODEL must stay the first argument; its panel first)

    def annotation(self) -> Any:
        if self.argument:
            return Annotated[self.type, typer.Argument(metavar=self.flags[0],
                                                       help=self.help, show_default=False)]
        env = {"envvar": self.envvar, "show_envvar": True} if self.envvar else {}
        return Annotated[self.type, typer.Option(*self.flags, help=self.help, rich_help_panel=self.panel, **env)]

    def parameter(self) -> inspect.Parameter:
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=self.annotation())


# The order is the order of the help listing and of validation (the first bad value is the one reported).
ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    EngineOption("model_arg", ("MODEL",), str | None, None, "Model: a .gguf path, a cached model or alias "
                 "(default: the embedded SmolLM2-135M).", target="cli", argument=True, leads=True),
    EngineOption("model", ("-m", "--model"), str | None, None, "Model .gguf path (same as the MODEL argument).",
                 target="cli", leads=True),
    EngineOption("pull", ("--pull",), bool, False, "Download the model first if it is not cached.",
                 target="cli", leads=True),
    EngineOption("n_gpu_layers", ("-ngl", "--n-gpu-layers", "--gpu-layers"), str, "auto",
                 "Layers to offload to the GPU: a number, 'auto' or 'all'.", parse=parse_gpu_layers),
    EngineOption("flash_attn", ("-fa", "--flash-attn"), str, "auto",
                 "Flash attention: on, off or auto (a bare -fa means on).", parse=_lower),
    EngineOption("n_ctx", ("-c", "--ctx-size"), int, 0, "Context size in tokens, over all sequences (0 = model "
                 "default, at most 4096 per sequence)."),
    EngineOption("n_threads", ("-t", "--threads"), int, 0, "CPU threads (0 = one per physical core)."),
    EngineOption("n_batch", ("-b", "--batch-size"), int, 2048, "Most tokens decoded in one step."),
    EngineOption("n_ubatch", ("-ub", "--ubatch-size"), int, 512, "Physical batch size."),
    EngineOption("cache_type_k", ("-ctk", "--cache-type-k"), str, "f16",
                 "KV cache type for K (f16, q8_0, q4_0, ...).", parse=_lower),
    EngineOption("cache_type_v", ("-ctv", "--cache-type-v"), str, "f16",
                 "KV cache type for V (f16, q8_0, q4_0, ...).", parse=_lower),
    EngineOption("split_mode", ("-sm", "--split-mode"), str, "layer", "Multi-GPU split: none, layer or row.",
                 parse=_lower),
    EngineOption("tensor_split", ("-ts", "--tensor-split"), str | None, None,
                 "Share of the model per GPU, e.g. 3,1.", parse=parse_tensor_split),
    EngineOption("main_gpu", ("-mg", "--main-gpu"), int, 0,
                 "GPU for the whole model (split none) or for intermediates (row)."),
    EngineOption("rpc_servers", ("--rpc",), str | None, None, "Split the model over `ggufchat rpc-worker`s: "
                 "host:port[,host:port...]. The RPC protocol has no authentication: private networks only.",
                 parse=_rpc_endpoints),
    # n-gram drafts by default: where nothing repeats they cost nothing (no match, no draft) and each
    # sequence's odds stop them where matches guess wrong; on copying work they pay 1.4-2x
    # (docs/benchmarks.md, speculation). The library's LoadOptions and `bench` keep none.
    EngineOption("spec", ("--spec", "--spec-type"), str, "auto", "Speculative decoding of greedy requests: "
                 "ngram (draft from the prompt and output, verify in the batch; llama.cpp's ngram-simple and "
                 "ngram-mod are accepted), draft (a draft model, -md), none, or auto: draft with -md, else ngram.",
                 parse=_spec, panel=_SPEC),
    EngineOption("model_draft", ("-md", "--model-draft", "--spec-draft-model"), str | None, None,
                 "Draft model (a .gguf path or a cached model) with the target's vocabulary; implies --spec draft.",
                 parse=_draft_model, panel=_SPEC),
    EngineOption("draft_max", ("--draft-max", "--draft-n", "--spec-draft-n-max"), int | None, None,
                 "Longest draft (default: 16 from a draft model, 48 from n-grams); shorter ones are used where "
                 "the measured acceptance and costs say they pay better.", panel=_SPEC),
    EngineOption("draft_min", ("--draft-min", "--draft-n-min", "--spec-draft-n-min"), int, 0,
                 "Drafts shorter than this are not verified.", panel=_SPEC),
    EngineOption("n_gpu_layers_draft", ("-ngld", "--n-gpu-layers-draft", "--gpu-layers-draft", "--spec-draft-ngl"),
                 str, "auto", "Draft model layers to offload to the GPU: a number, 'auto' or 'all'.",
                 parse=parse_gpu_layers, panel=_SPEC),
    EngineOption("chat_template", ("--chat-template",), str | None, None, "Built-in template instead of the "
                 "model's: chatml, qwen, llama-3, llama-2, gemma, mistral, phi-3.", target="engine"),
    EngineOption("chat_template_file", ("--chat-template-file",), Path | None, None,
                 "Jinja chat template file instead of the model's.", target="engine"),
    # The engine's default seed; `chat` also samples with it, which is why it sits in the Sampling panel.
    EngineOption("seed", ("-s", "--seed"), int | None, None, "Sampling seed (default: random).", panel=_SAMPLING),
)
BY_NAME = {option.name: option for option in ENGINE_OPTIONS}

_LOAD_FIELDS = {f.name for f in dataclasses.fields(LoadOptions)}
for _option in ENGINE_OPTIONS:  # a renamed LoadOptions field must fail at import, not on first use
    if _option.target == "load" and _option.name not in _LOAD_FIELDS:
        raise TypeError(f"engine option {_option.name!r} names no LoadOptions field")

ModelArg = BY_NAME["model_arg"].annotation()  # also the MODEL of `ggufchat show`

# Sampling flags are `chat`'s alone (the server takes them per request), so they stay plain aliases.
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


class EngineFlags:
    """The declared options as one command line gave them, turned into what the engine takes."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values  # by declaration name, as typer parsed them

    @property
    def model(self) -> str | None:
        """What the user named as the model (MODEL or -m), before resolving it to a file."""
        return pick_model(self.values.get("model_arg"), self.values.get("model"))

    @property
    def seed(self) -> int | None:
        return self.values.get("seed")

    def for_model(self, spec: str | None, settings: dict[str, Any] | None = None) -> EngineFlags:
        """These flags for another model (`spec` as MODEL would be given), with `settings` (values by
        option name, as typer would parse them) over them: one model of a server holding several."""
        return EngineFlags({**self.values, "model_arg": spec, "model": None, **(settings or {})})

    def load_options(self, **fixed: Any) -> LoadOptions:
        """LoadOptions from the flags, plus `fixed`: fields the verb sets itself (serve's -np is n_seq_max,
        bench sizes the context and pins the seed)."""
        taken = sorted(set(fixed) & set(self.values))
        if taken:  # the verb would silently override what the user asked for
            raise TypeError(f"{taken} are flags of this command; do not also fix them")
        # The model first, then the options in table order: the same order of errors as always.
        kwargs: dict[str, Any] = {"model_path": _model_path(self.model, self.values.get("pull", False))}
        for option in ENGINE_OPTIONS:
            if option.target == "load" and option.name in self.values:
                kwargs[option.name] = option.parse(self.values[option.name])
        options = LoadOptions(**kwargs, **fixed)
        options.validate()
        return options

    def engine_kwargs(self) -> dict[str, Any]:
        """Engine(...) keywords beyond LoadOptions (the chat template)."""
        return {o.name: o.parse(self.values[o.name]) for o in ENGINE_OPTIONS
                if o.target == "engine" and o.name in self.values}


def engine_options(*, omit: Iterable[str] = (),
                   defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Give a command the declared engine options, except those in `omit` (names from ENGINE_OPTIONS:
    only options the verb decides itself, so a flag it would ignore is never offered), with `defaults`
    (by option name) over the declared defaults.

    The command declares one parameter annotated `EngineFlags`; the options take its place in the
    signature (so they keep their place in the help), except MODEL, -m and --pull, which open it. The
    command is called with that parameter set to an EngineFlags object.
    """
    omit = set(omit)
    defaults = defaults or {}
    unknown = (omit | set(defaults)) - set(BY_NAME)
    if unknown:
        raise TypeError(f"unknown engine options {sorted(unknown)}")
    chosen = [dataclasses.replace(o, default=defaults[o.name]) if o.name in defaults else o
              for o in ENGINE_OPTIONS if o.name not in omit]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        markers = [p.name for p in signature.parameters.values() if p.annotation is EngineFlags]
        if len(markers) != 1:
            raise TypeError(f"{command.__name__} needs exactly one parameter annotated EngineFlags")
        marker = markers[0]
        clash = {o.name for o in chosen} & set(signature.parameters)
        if clash:
            raise TypeError(f"{command.__name__} has parameters named like engine options: {sorted(clash)}")
        params = [o.parameter() for o in chosen if o.leads]
        for p in signature.parameters.values():
            if p.name == marker:
                params += [o.parameter() for o in chosen if not o.leads]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def with_engine_flags(**kwargs: Any) -> Any:
            values = {o.name: kwargs.pop(o.name) for o in chosen}
            return command(**kwargs, **{marker: EngineFlags(values)})

        with_engine_flags.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        # typer also reads the annotations (typing.get_type_hints); give it the spliced ones, evaluated.
        with_engine_flags.__annotations__ = {p.name: p.annotation for p in params}
        return with_engine_flags

    return decorate


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
