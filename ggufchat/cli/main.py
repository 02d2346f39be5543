"""The `ggufchat` entry point and the CLI's one error table."""

from __future__ import annotations

import logging
import sys

import typer

try:  # recent typer vendors its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException, NoArgsIsHelpError

from ggufchat import __version__
from ggufchat.errors import GgufchatError
from ggufchat.settings import load_settings

app = typer.Typer(
    name="ggufchat",
    help="Run quantized GGUF language models: download, chat in the terminal, serve over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"ggufchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Run quantized GGUF language models."""


def _register() -> None:
    # Imported here so `ggufchat --help` does not pay for every verb's imports twice.
    from ggufchat.cli import bench, build, chat, doctor, embed, models, rpc_worker, serve

    for module in (chat, serve, embed, models, bench, doctor, build, rpc_worker):
        module.register(app)


def _debug() -> bool:
    try:
        return load_settings().debug
    except GgufchatError:
        # Another variable is unreadable: the command that needs it reports it; `--help` still works.
        return False


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or _debug() else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # llama.cpp narrates every load at INFO and warns about choices we made on purpose
    # (n_ctx_seq < n_ctx_train); show it only when asked.
    logging.getLogger("ggufchat.llama").setLevel(logging.DEBUG if verbose or _debug() else logging.ERROR)


def error_line(exc: BaseException) -> str:
    """One line: what went wrong, then what to do next."""
    message = str(exc).strip() or type(exc).__name__
    hint = getattr(exc, "hint", None)
    line = f"Error: {message}"  # not capitalised: messages may start with a name or a path
    if hint:
        line = f"{line.rstrip('.')}. {hint}"
    return line.replace("\n", " ")


_OPTIONAL_VALUE = {"-fa": "on", "--flash-attn": "on"}
_FA_VALUES = {"on", "off", "auto"}


def normalize_argv(args: list[str]) -> list[str]:
    """llama.cpp accepts a bare `-fa` (older builds had no value); click needs one, so supply it."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in _OPTIONAL_VALUE:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.lower() not in _FA_VALUES:
                out.append(_OPTIONAL_VALUE[arg])
    return out


def run(argv: list[str] | None = None) -> None:
    _register()
    setup_logging()
    args = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    try:
        code = app(args=args, standalone_mode=False)
        # typer turns Ctrl-C into Exit(130) and, outside standalone mode, returns exit codes instead of raising.
        if isinstance(code, int) and code:
            if code == 130:
                print(file=sys.stderr)
            sys.exit(code)
    except GgufchatError as exc:
        if _debug():
            raise
        print(error_line(exc), file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print(file=sys.stderr)
        sys.exit(130)
    except NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        sys.exit(2)
    except ClickException as exc:
        # Usage errors keep click's own message (it names the bad flag) but on one line.
        print(f"Error: {exc.format_message()} (see `ggufchat {_command(argv)}--help`)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if _debug():
            raise
        print(f"Error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        sys.exit(1)


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"{args[0]} " if args and not args[0].startswith("-") else ""
