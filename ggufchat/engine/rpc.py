"""llama.cpp's RPC backend: remote ggml devices for a split model, and the worker that offers them.

Both halves are llama.cpp's own code (ggml-rpc, compiled into llama-cpp-python when it is built with
-DGGML_RPC=on); this module only reaches it through ggml's backend registry, as llama-cli's `--rpc`
and the `rpc-server` tool do. The protocol has no authentication and no encryption: a worker runs
whatever tensors any client sends, so it belongs on loopback or a private network only.
"""

from __future__ import annotations

import ctypes
import ipaddress

from ggufchat.engine.backend import BACKEND, RpcError
from ggufchat.engine.devices import Device, list_devices
from ggufchat.errors import InvalidParameter

__all__ = ["DEFAULT_PORT", "RpcError", "connect", "is_loopback", "parse_endpoints", "pick_devices",
           "require_support", "serve", "visible_devices"]

DEFAULT_PORT = 50052


def require_support() -> None:
    """Raise RpcError when this build has no RPC backend."""
    BACKEND.rpc_reg()


def parse_endpoints(text: str | list[str] | None) -> list[str]:
    """'host:port,host:port' -> ['host:port', ...]; a missing port means 50052."""
    if not text:
        return []
    items = text if isinstance(text, list) else text.split(",")
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep:
            host, port_text = item, str(DEFAULT_PORT)
        host = host.strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not host or not 0 < port < 65536:
            raise InvalidParameter(f"--rpc takes host:port[,host:port...], not {item!r}", param="rpc")
        endpoint = f"{host}:{port}"
        if endpoint in out:
            raise InvalidParameter(f"--rpc names {endpoint} twice", param="rpc")
        out.append(endpoint)
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(endpoints: list[str]) -> list[int]:
    """Register each worker's devices with ggml (once per process) and return their handles, in order."""
    return BACKEND.connect_rpc(endpoints)


def visible_devices(endpoints: list[str]) -> list[Device]:
    """This machine's devices and those of the workers at `endpoints` (connecting them)."""
    return list_devices(remote=connect(endpoints))


def serve(host: str, port: int, *, threads: int, devices: list[int], cache_dir: str | None = None) -> None:
    """Run llama.cpp's RPC server for `devices` (from pick_devices) on this thread; on success it never
    returns."""
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(
        BACKEND.rpc_proc("ggml_backend_rpc_start_server"))
    arr = (ctypes.c_void_p * len(devices))(*devices)
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), arr)


def pick_devices(names: list[str] | None) -> list[int]:
    """The named devices, else every GPU, else the CPU: the choice llama.cpp's rpc-server makes."""
    devices = list_devices()
    if names:
        by_name = {d.name.lower(): d for d in devices}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise InvalidParameter(f"no device named {', '.join(missing)}; this machine has "
                                   f"{', '.join(d.name for d in devices)}", param="device")
        return [by_name[n.lower()].handle for n in names]
    gpus = [d.handle for d in devices if d.kind in ("gpu", "igpu")]
    return gpus or [d.handle for d in devices if d.kind == "cpu"]
