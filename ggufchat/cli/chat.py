"""`ggufchat chat`: interactive terminal chat, or one reply with -p / piped stdin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from ggufchat.chat.conversation import RawConversation, TemplateConversation, process_escapes
from ggufchat.chat.repl import ChatConfig, one_shot, run_repl
from ggufchat.cli import options as o
from ggufchat.engine import Engine
from ggufchat.errors import InvalidParameter
from ggufchat.settings import Settings, load_settings

_CHAT = "Chat"
_RAW = "Raw mode (llama-cli compatible)"


def _announce(engine: Engine) -> None:
    print(f"ggufchat: model {engine.model_path} ({engine.model_description}, template {engine.template.name}, "
          f"context {engine.n_ctx_seq} tokens, {engine.offload_summary()}{_speculation(engine)})", file=sys.stderr)


def _speculation(engine: Engine) -> str:
    o = engine.options
    if o.spec == "draft":
        return f", drafts from {o.model_draft.name}"
    return ", n-gram drafts" if o.spec == "ngram" else ""


def _use_color(flag: bool | None, settings: Settings) -> bool:
    if settings.no_color:  # no-color.org: it wins over --color too
        return False
    return sys.stdout.isatty() if flag is None else flag


@o.engine_options()
def chat(
    *,  # engine_flags, filled in by engine_options, has no default
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Answer this prompt, print only the "
                                                  "reply on stdout, and exit.", rich_help_panel=_CHAT)] = None,
    interactive: Annotated[bool, typer.Option("-i", "--interactive", help="Chat interactively even when "
                                              "stdin is not a terminal.", rich_help_panel=_CHAT)] = False,
    interactive_first: Annotated[bool, typer.Option("-if", "--interactive-first", help="Interactive, and wait "
                                                    "for your input before generating anything.",
                                                    rich_help_panel=_CHAT)] = False,
    in_prefix: Annotated[str | None, typer.Option("--in-prefix", help="Raw mode: text put before each of "
                                                     "your messages (escapes like \\n are read).",
                                                     rich_help_panel=_RAW)] = None,
    in_suffix: Annotated[str | None, typer.Option("--in-suffix", help="Raw mode: text put after each of "
                                                     "your messages.", rich_help_panel=_RAW)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Raw mode without prefix/suffix: no chat template, -f is "
                                      "the initial prompt.", rich_help_panel=_RAW)] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-turn tokens "
                                             "(until -n or the context ends).", rich_help_panel=_CHAT)] = False,
    context_shift: Annotated[bool, typer.Option("--context-shift", help="When the conversation outgrows the "
                                                "context, drop the oldest turns instead of stopping.",
                                                rich_help_panel=_CHAT)] = False,
    system: Annotated[str | None, typer.Option("--system", "-sys", help="System prompt.",
                                                  rich_help_panel=_CHAT)] = None,
    system_file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the system prompt from "
                                                        "FILE (raw mode: the initial prompt).",
                                                        rich_help_panel=_CHAT)] = None,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="Most tokens per reply (-1 = until the "
                                           "context is full).", rich_help_panel=_CHAT)] = -1,
    reverse_prompt: Annotated[list[str] | None, typer.Option(
        "-r", "--reverse-prompt", help="Stop the reply at this text (repeatable).", rich_help_panel=_CHAT)] = None,
    color: Annotated[bool | None, typer.Option("-co/-no-co", "--color/--no-color", help="Colour the prompt "
                                                  "(default: when stdout is a terminal; NO_COLOR turns it "
                                                  "off).", rich_help_panel=_CHAT, show_default=False)] = None,
    reasoning_format: Annotated[Literal["deepseek", "none"], typer.Option(
        "--reasoning-format", help="deepseek: a reasoning model's <think> text is shown dimmed, apart from the "
        "answer, and left out of the conversation; none: the raw text, tags and all.",
        rich_help_panel=_CHAT)] = "deepseek",
    hide_thinking: Annotated[bool, typer.Option("--hide-thinking", help="Don't print a reasoning model's "
                                                "thinking, only how many tokens it took (stderr).",
                                                rich_help_panel=_CHAT)] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and speeds after each reply "
                                        "(stderr).", rich_help_panel=_CHAT)] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show llama.cpp's log.",
                                          rich_help_panel=_CHAT)] = False,
    engine_flags: o.EngineFlags,
    temp: o.Temp = 0.8,
    top_k: o.TopK = 40,
    top_p: o.TopP = 0.95,
    min_p: o.MinP = 0.05,
    repeat_penalty: o.RepeatPenalty = 1.0,
    repeat_last_n: o.RepeatLastN = 64,
    presence_penalty: o.PresencePenalty = 0.0,
    frequency_penalty: o.FrequencyPenalty = 0.0,
) -> None:
    """Chat with a model in the terminal (one reply with -p or piped stdin)."""
    if verbose:
        from ggufchat.cli.main import setup_logging

        setup_logging(verbose=True)
    if n_predict == 0 or n_predict < -1:
        raise InvalidParameter("-n/--n-predict must be positive, or -1 for no limit", param="n_predict")
    if system_file is not None:
        if system is not None:
            raise InvalidParameter("give the system prompt with --system or -f, not both")
        system = _read_text(system_file)
    raw = raw or in_prefix is not None or in_suffix is not None
    interactive = interactive or interactive_first
    if prompt is not None and interactive:
        raise InvalidParameter("-p answers one prompt and exits; it cannot be combined with -i")
    if prompt is None and not interactive and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise InvalidParameter("stdin was empty", hint="Pipe a prompt in, or pass one with -p.")
    cfg = ChatConfig(
        system=system,
        sampling=o.sampling_params(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                   seed=engine_flags.seed),
        max_tokens=None if n_predict == -1 else n_predict,
        stop=[process_escapes(r) for r in reverse_prompt or []],
        stats=stats,
        color=_use_color(color, load_settings()),
        context_shift=context_shift,
        ignore_eos=ignore_eos,
        reasoning_format=reasoning_format,
        hide_thinking=hide_thinking,
    )
    load = engine_flags.load_options()
    with Engine(load, **engine_flags.engine_kwargs()) as engine:
        _announce(engine)
        convo = (RawConversation(engine, system or "", process_escapes(in_prefix or ""),
                                 process_escapes(in_suffix or "")) if raw else TemplateConversation(engine, system))
        if prompt is not None:
            one_shot(engine, prompt, cfg, convo=convo)
            return
        _enable_line_editing()
        if not raw:
            print("Type a message; /help for commands, Ctrl-D to leave.", file=sys.stderr)
            run_repl(engine, cfg, convo=convo)
            return
        print("Raw mode: your text goes between --in-prefix and --in-suffix; /help for commands.",
              file=sys.stderr)
        # Like llama-cli: without -if the model first continues the initial prompt.
        run_repl(engine, cfg, convo=convo, generate_first=not interactive_first and bool(convo.system))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidParameter(f"cannot read {path}: {exc.strerror}") from exc


def _enable_line_editing() -> None:
    # Importing readline is what gives input() arrow keys and history.
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
