"""llama.cpp's RPC backend: remote ggml devices for a split model, and the worker that offers them.

Both halves are llama.cpp's own code (ggml-rpc, compiled into llama-cpp-python when it is built with
-DGGML_RPC=on); this module only reaches it through ggml's backend registry, as llama-cli's `--rpc`
and the `rpc-server` tool do. The protocol has no authentication and no encryption: a worker runs
whatever tensors any client sends, so it belongs on loopback or a private network only.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import llama_cpp

from ggufchat.engine.devices import _libs
from ggufchat.engine.loader import init_backend
from ggufchat.errors import GgufchatError, InvalidParameter

DEFAULT_PORT = 50052

# Endpoint -> its ggml devices. ggml's RPC registry keeps one entry per endpoint for the process's
# life; registering the same one twice would list its devices twice.
_registered: dict[str, list[int]] = {}


class RpcError(GgufchatError):
    """RPC is unavailable in this build, or a worker cannot be reached."""


def _rpc_reg() -> int:
    """ggml's registry entry for the RPC backend; one clear error when this build has none."""
    init_backend()
    reg = _libs()[1].ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None
    if not reg:
        raise RpcError("this llama-cpp-python was built without RPC support",
                       hint="Rebuild it with `ggufchat build --cpu` (or `--cuda`); both include the RPC backend.")
    return reg


def require_support() -> None:
    _rpc_reg()


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


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RpcError(f"cannot reach the RPC worker at {endpoint}: {exc.strerror or exc}",
                       hint=f"Start one there with `ggufchat rpc-worker --host {host} --port {port}`, "
                            "and check that no firewall is in the way.") from None


def connect(endpoints: list[str]) -> list[int]:
    """Register each worker's devices with ggml (once per process) and return them, in order."""
    if not endpoints:
        return []
    rpc = _rpc_reg()
    base, reg = _libs()
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        base.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server"))
    devices: list[int] = []
    for endpoint in endpoints:
        # Checked on every load, not just the first: ggml aborts the process on a dead worker.
        _check_reachable(endpoint)
        if endpoint not in _registered:
            server = add_server(endpoint.encode())
            if not server:
                raise RpcError(f"the RPC worker at {endpoint} answered but offered no device",
                               hint="It may speak another RPC protocol version: run the same ggufchat "
                                    "(and llama-cpp-python) on both ends.")
            reg.ggml_backend_register(server)
            _registered[endpoint] = [base.ggml_backend_reg_dev_get(server, i)
                                     for i in range(base.ggml_backend_reg_dev_count(server))]
        devices.extend(_registered[endpoint])
    return devices


def any_registered() -> bool:
    return bool(_registered)


def serve(host: str, port: int, *, threads: int, devices: list[int], cache_dir: str | None = None) -> None:
    """Run llama.cpp's RPC server for `devices` (from pick_devices) on this thread; on success it never
    returns."""
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(
        _libs()[0].ggml_backend_reg_get_proc_address(_rpc_reg(), b"ggml_backend_rpc_start_server"))
    arr = (ctypes.c_void_p * len(devices))(*devices)
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), arr)


def pick_devices(names: list[str] | None) -> list[int]:
    """The named devices, else every GPU, else the CPU: the choice llama.cpp's rpc-server makes."""
    from ggufchat.engine.devices import list_devices

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
