"""`ggufchat rpc-worker`: lend this machine's devices to a model split across hosts (llama.cpp RPC)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from ggufchat.engine import rpc
from ggufchat.engine.loader import default_threads
from ggufchat.errors import GgufchatError
from ggufchat.settings import load_settings

WARNING = ("WARNING: llama.cpp's RPC protocol has no authentication and no encryption: anyone who can "
           "reach {endpoint} can run computations on this machine and read what it holds. Use it on a "
           "private network only.")


def rpc_worker(
    host: Annotated[str, typer.Option("-H", "--host", help="Address to listen on. Anything but loopback "
                                      "exposes an unauthenticated service: private networks only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("-p", "--port", help="TCP port.")] = rpc.DEFAULT_PORT,
    threads: Annotated[int, typer.Option("-t", "--threads", help="CPU threads when serving the CPU "
                                         "(0 = one per physical core).")] = 0,
    device: Annotated[str | None, typer.Option("-d", "--device", help="Devices to offer, comma-separated "
                                               "(names from `ggufchat doctor`; default: every GPU, else "
                                               "the CPU).")] = None,
    cache: Annotated[bool, typer.Option("-c", "--cache", help="Keep tensors clients send in a local file "
                                        "cache, so a reload does not cross the network again.")] = False,
) -> None:
    """Run llama.cpp's RPC server: `chat`/`serve --rpc HOST:PORT` on another machine put layers here."""
    rpc.require_support()
    if not 0 < port < 65536:
        raise GgufchatError(f"--port must be 1-65535, not {port}")
    endpoint = f"{host}:{port}"
    _check_port_free(host, port)
    names = [d.strip() for d in device.split(",") if d.strip()] if device else None
    devices = rpc.pick_devices(names)  # validates names before anything listens
    cache_dir = None
    if cache:
        cache_dir = str(load_settings().llama_cache_dir / "rpc")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if not rpc.is_loopback(host):
        print(WARNING.format(endpoint=endpoint), file=sys.stderr)
    print(f"ggufchat rpc-worker: serving {len(devices)} device(s) on {endpoint}; "
          f"connect with --rpc {endpoint}. Ctrl-C stops.", file=sys.stderr)
    sys.stderr.flush()

    # llama.cpp's server loop blocks in accept() forever and never returns to Python, so it runs on a
    # daemon thread and the main thread stays free to take Ctrl-C.
    worker = threading.Thread(target=rpc.serve, name="rpc-worker", daemon=True,
                              kwargs=dict(host=host, port=port, threads=threads or default_threads(),
                                          devices=devices, cache_dir=cache_dir))
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nrpc-worker stopped", file=sys.stderr)
        os._exit(0)  # the C thread cannot be interrupted; leave without waiting for it
    sys.stdout.flush()
    raise GgufchatError(f"llama.cpp's RPC server on {endpoint} stopped (see its message above)",
                        hint="Check the address and port, then start it again.")


def _check_port_free(host: str, port: int) -> None:
    """llama.cpp only prints 'Failed to create server socket'; say which port and why, up front."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise GgufchatError(f"cannot resolve --host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise GgufchatError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                hint="Pick another --port, or stop what is using it.") from None


def register(app: typer.Typer) -> None:
    app.command("rpc-worker")(rpc_worker)
