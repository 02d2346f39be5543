"""`ggufchat list`, `show` and `rm`: the local model cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ggufchat.cli import options as o
from ggufchat.models.catalog import quant_of, split_names
from ggufchat.models.embedded import NAME as EMBEDDED_NAME
from ggufchat.models.embedded import embedded_model_path
from ggufchat.models.gguf import read_gguf
from ggufchat.models.resolve import resolve_model
from ggufchat.models.store import Store
from ggufchat.settings import load_settings


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    return str(n)


def describe(path: Path, name: str) -> dict:
    """Metadata of a model from its GGUF header(s); split models add up their parts."""
    info = read_gguf(path)
    params = info.parameter_count
    size = path.stat().st_size
    for name_of_part in split_names(path.name)[1:]:
        part = path.with_name(name_of_part)
        params += read_gguf(part).parameter_count
        size += part.stat().st_size
    return {
        "name": name,
        "quant": quant_of(path.name) or str(info.get("general.file_type", "")),
        "size_bytes": size,
        "architecture": info.architecture,
        "parameters": params,
        "context_length": info.context_length,
        "path": str(path),
        "info": info,
    }


def _rows() -> list[dict]:
    rows = [describe(m.path, m.name) | {"source": m.manifest.source} for m in Store(load_settings().home).models()]
    try:
        rows.insert(0, describe(embedded_model_path(), EMBEDDED_NAME) | {"source": "embedded"})
    except Exception:  # not installed: nothing to list for it
        pass
    return rows


def list_models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """List cached models with their size, architecture, parameters and context length."""
    rows = _rows()
    if as_json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "info"}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "quant", "size", "arch", "params", "context", "source", box=None)
    cells = [[r["name"], r["quant"], _human(r["size_bytes"]), r["architecture"] or "?",
              _human(r["parameters"], ""), str(r["context_length"] or "?"), r["source"]] for r in rows]
    for row in cells:
        table.add_row(*row)
    # Names are what users copy into other commands: never cut them, even in a narrow pipe.
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(
        ("name", "quant", "size", "arch", "params", "context", "source"))]
    needed = sum(widths) + 2 * len(widths) + 2
    Console(width=max(Console().width, needed)).print(table)


def show(model_arg: o.ModelArg = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
         template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False) -> None:
    """Show a model's metadata, chat template and path."""
    path = resolve_model(model_arg)
    row = describe(path, model_arg or EMBEDDED_NAME)
    info = row.pop("info")
    if template:
        print(info.chat_template or "")
        return
    metadata = {k: (v if not isinstance(v, list) or len(v) <= 16 else f"<{len(v)} items>")
                for k, v in info.metadata.items() if k != "tokenizer.chat_template"}
    if as_json:
        print(json.dumps({**row, "chat_template": info.chat_template, "metadata": metadata}, default=str))
        return
    for key in ("name", "path", "quant", "architecture", "context_length"):
        print(f"{key:15} {row[key]}")
    print(f"{'size':15} {_human(row['size_bytes'])}")
    print(f"{'parameters':15} {_human(row['parameters'], '')}")
    print("\nmetadata:")
    for k, v in metadata.items():
        print(f"  {k} = {v}")
    print("\nchat template:")
    print(info.chat_template or "  (none: ggufchat uses chatml)")


def rm(name: Annotated[str, typer.Argument(help="Cached model name (see `ggufchat list`).")]) -> None:
    """Remove a model from the cache."""
    model = Store(load_settings().home).remove(name)
    print(f"removed {model.name} ({_human(model.size)})")


def download_model(
    model: Annotated[str, typer.Argument(help="alias[:quant], hf://OWNER/REPO[:QUANT|/FILE], "
                                              "ms://OWNER/REPO[:QUANT|/FILE], or an https URL of a .gguf "
                                              "(#sha256=HEX checks it).", show_default=False)],
    source: Annotated[str, typer.Option("--source", help="hf, ms, or auto (Hugging Face, then ModelScope).")]
    = "auto",
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="Read the hub token from FILE "
                                                    "(default: HF_TOKEN / MODELSCOPE_API_TOKEN).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use the cache only (also GGUFCHAT_OFFLINE=1).")]
    = False,
    sha256: Annotated[str | None, typer.Option("--sha256", metavar="HEX",
                                               help="Expected sha256 of the file (single-file models).")] = None,
) -> None:
    """Download a GGUF model from Hugging Face, ModelScope or a URL into the cache (resumable, verified)."""
    import sys

    from ggufchat.errors import InvalidParameter
    from ggufchat.models.hub import download

    settings = load_settings()
    if offline:
        settings.offline = True
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidParameter(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
    try:
        model = download(model, settings, source=source.lower(), revision=revision, token=token, sha256=sha256,
                         report=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted: what arrived is kept; run the same command again to continue", file=sys.stderr)
        raise
    print(model.path)


def quantize_model(
    source: Annotated[Path, typer.Argument(metavar="IN.gguf", help="Model to quantize.", show_default=False)],
    dest: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="File to write.", show_default=False)],
    qtype: Annotated[str, typer.Argument(metavar="TYPE", help="Quant type: q4_k_m, q5_k_m, q8_0, q4_0, ...",
                                         show_default=False)],
    threads: Annotated[int, typer.Option("-t", "--threads", help="CPU threads (0 = one per core).")] = 0,
) -> None:
    """Quantize a GGUF model with llama.cpp's quantizer."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ggufchat.engine.quantize import check_args, quantize

    check_args(source, dest, qtype)
    with Progress(TextColumn("quantizing to " + qtype.lower()), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tensors"), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("quantize", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        out = quantize(source, dest, qtype, threads=threads, progress=progress)
    print(f"{out} ({_human(out.stat().st_size)}, was {_human(source.stat().st_size)})")


def register(app: typer.Typer) -> None:
    app.command("download")(download_model)
    app.command("quantize")(quantize_model)
    app.command("list")(list_models)
    app.command("show")(show)
    app.command("rm")(rm)
