"""`ggufchat doctor`: what this installation can do, and where things are."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from ggufchat import __version__
from ggufchat.errors import GgufchatError


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def collect(rpc_servers: list[str] | None = None) -> dict:
    from ggufchat.engine.devices import system_info
    from ggufchat.engine.rpc import visible_devices
    from ggufchat.models.embedded import embedded_model_path
    from ggufchat.settings import load_settings

    info = system_info()
    try:
        path = embedded_model_path()
        default_model = {"path": str(path), "size_bytes": path.stat().st_size}
    except GgufchatError as exc:
        default_model = {"error": str(exc)}
    settings = load_settings()
    devices = visible_devices(rpc_servers or [])
    return {
        "versions": {
            "ggufchat": __version__,
            "python": platform.python_version(),
            "llama-cpp-python": _pkg("llama-cpp-python"),
            "huggingface_hub": _pkg("huggingface_hub"),
            "modelscope": _pkg("modelscope"),
        },
        "platform": platform.platform(),
        "llama_cpp": info,
        "devices": [d.report() for d in devices],
        "cuda_devices": [d.description for d in devices if d.kind == "gpu" and "CUDA" in d.name],
        "default_model": default_model,
        "home": str(settings.home),
    }


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    rpc: Annotated[str | None, typer.Option("--rpc", help="Also list the devices of these rpc-workers "
                                            "(host:port[,host:port...]).")] = None,
) -> None:
    """Show llama.cpp's build features, devices, versions and the default model."""
    from ggufchat.engine.rpc import parse_endpoints

    report = collect(parse_endpoints(rpc))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    v = report["versions"]
    con.print(f"[bold]ggufchat[/] {v['ggufchat']}  python {v['python']}  llama-cpp-python "
              f"{v['llama-cpp-python']}  huggingface_hub {v['huggingface_hub']}  modelscope {v['modelscope']}")
    con.print(f"platform      {report['platform']}")
    ll = report["llama_cpp"]
    con.print(f"llama.cpp     {ll['system_info']}")
    offload = (f"[green]yes[/] ({', '.join(ll['gpu_backends'])})" if ll["gpu_offload"]
               else "[yellow]no (CPU-only build)[/]")
    rpc_state = "yes (`ggufchat rpc-worker`, --rpc)" if ll["rpc"] else "no"
    con.print(f"GPU offload   {offload}    RPC {rpc_state}")
    table = Table("device", "backend", "kind", "description", "free", "total", box=None)
    for d in report["devices"]:
        table.add_row(d["name"], d["backend"], d["kind"], d["description"], _gib(d["free_bytes"]),
                      _gib(d["total_bytes"]))
    con.print(table)
    if not report["cuda_devices"]:
        con.print("CUDA devices  none visible")
    dm = report["default_model"]
    con.print(f"default model {dm.get('path', dm.get('error'))}"
              + (f" ({dm['size_bytes'] / 2**20:.0f} MiB)" if "size_bytes" in dm else ""))
    con.print(f"model cache   {report['home']}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
