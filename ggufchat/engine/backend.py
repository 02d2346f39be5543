"""llama.cpp's process-wide state, in one object: backend initialisation, ggml's device registry (with
the RPC workers registered in it) and the capture of llama.cpp's log.

This state is process-wide by nature, not by choice: llama.cpp has one backend, one device registry and
one log callback per process, whatever number of models or engines Python holds. So there is exactly
one `Backend`, `BACKEND` below, and every other engine module reaches llama.cpp's global state through
it. It sits at the bottom of the engine's imports (it imports no other engine module), which is what
keeps loader, rpc and devices free of import cycles.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

from ggufchat.errors import GgufchatError

# ggml_log_level in the vendored ggml: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5.
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5


class RpcError(GgufchatError):
    """RPC is unavailable in this build, or a worker cannot be reached."""


class LogCapture:
    """Routes llama.cpp's log to Python logging (logger `ggufchat.llama`), and keeps its recent
    warnings: llama.cpp explains a failed load only in its log (e.g. "failed to read magic"), and the
    loader puts those lines into the exception it raises instead of letting them scroll past."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("ggufchat.llama")
        self._recent: collections.deque[str] = collections.deque(maxlen=16)
        self._lock = threading.Lock()
        self._last_level = logging.DEBUG
        self._listeners: list[Callable[[str], None]] = []
        # llama.cpp keeps only the C function pointer: this attribute is the reference that keeps the
        # ctypes callback (and the bound method inside it) from being garbage-collected while C may
        # still call it, i.e. for the life of the process, which the one Backend instance has.
        self._c_callback = llama_cpp.llama_log_callback(self._on_log)

    def install(self) -> None:
        llama_cpp.llama_log_set(self._c_callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        # Level 5 continues the previous line.
        py_level = self._last_level if level == _CONT else _LEVELS.get(level, logging.DEBUG)
        self._last_level = py_level
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if not line:
            return
        if py_level >= logging.WARNING:
            with self._lock:
                self._recent.append(line.strip())
        for listener in list(self._listeners):
            listener(line)
        self.logger.log(py_level, line)

    @contextmanager
    def listening(self, fn: Callable[[str], None]) -> Iterator[None]:
        """Call fn with each log line while the block runs (e.g. a progress bar during quantize)."""
        self._listeners.append(fn)
        try:
            yield
        finally:
            self._listeners.remove(fn)

    def take_recent(self) -> list[str]:
        """Return and forget the warnings and errors llama.cpp logged since the last call."""
        with self._lock:
            lines = list(self._recent)
            self._recent.clear()
        return lines


def library_folder() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


class Backend:
    """llama.cpp's backend, once per process (see the module docstring)."""

    def __init__(self) -> None:
        self.log = LogCapture()
        self._lock = threading.Lock()  # loads (server threads) and doctor may race to initialise
        self._ready = False
        # Endpoint -> its ggml devices. ggml's RPC registry keeps one entry per endpoint for the
        # process's life; registering the same one twice would list its devices twice.
        self._rpc: dict[str, list[int]] = {}

    def ensure_ready(self) -> None:
        """Route llama.cpp's log to Python logging, then initialise its backends; once per process."""
        if self._ready:
            return
        with self._lock:
            if not self._ready:
                self.log.install()
                llama_cpp.llama_backend_init()
                self._ready = True

    @functools.cached_property
    def libs(self) -> tuple[ctypes.CDLL, ctypes.CDLL]:
        """(libggml-base, libggml) with the signatures used here: the registry, devices, backends. The
        llama-cpp-python bindings do not wrap ggml's device registry, so it is read from the same shared
        libraries llama_cpp loaded."""
        folder = library_folder()
        base = ctypes.CDLL(str(folder / "libggml-base.so"))
        reg = ctypes.CDLL(str(folder / "libggml.so"))
        reg.ggml_backend_dev_count.restype = ctypes.c_size_t
        reg.ggml_backend_dev_get.restype = ctypes.c_void_p
        reg.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        reg.ggml_backend_reg_count.restype = ctypes.c_size_t
        reg.ggml_backend_reg_get.restype = ctypes.c_void_p
        reg.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description", "ggml_backend_reg_name"):
            getattr(base, fn).restype = ctypes.c_char_p
            getattr(base, fn).argtypes = [ctypes.c_void_p]
        reg.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        reg.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        reg.ggml_backend_register.restype = None
        reg.ggml_backend_register.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        base.ggml_backend_dev_type.restype = ctypes.c_int
        base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        base.ggml_backend_dev_memory.restype = None
        base.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        return base, reg

    # The RPC part of the registry.
    def rpc_reg(self) -> int:
        """ggml's registry entry for the RPC backend; one clear error when this build has none."""
        self.ensure_ready()
        reg = self.libs[1].ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None
        if not reg:
            raise RpcError("this llama-cpp-python was built without RPC support",
                           hint="Rebuild it with `ggufchat build --cpu` (or `--cuda`); both include the RPC "
                                "backend.")
        return reg

    def rpc_proc(self, name: str) -> int:
        """The address of a function the RPC backend exports (not in the bindings' headers)."""
        return self.libs[0].ggml_backend_reg_get_proc_address(self.rpc_reg(), name.encode())

    def connect_rpc(self, endpoints: list[str]) -> list[int]:
        """Register each worker's devices with ggml (once per process) and return them, in order."""
        if not endpoints:
            return []
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(self.rpc_proc("ggml_backend_rpc_add_server"))
        base, reg = self.libs
        devices: list[int] = []
        for endpoint in endpoints:
            # Checked on every load, not just the first: ggml aborts the process on a dead worker.
            _check_reachable(endpoint)
            with self._lock:
                if endpoint not in self._rpc:
                    server = add_server(endpoint.encode())
                    if not server:
                        raise RpcError(f"the RPC worker at {endpoint} answered but offered no device",
                                       hint="It may speak another RPC protocol version: run the same ggufchat "
                                            "(and llama-cpp-python) on both ends.")
                    reg.ggml_backend_register(server)
                    self._rpc[endpoint] = [base.ggml_backend_reg_dev_get(server, i)
                                           for i in range(base.ggml_backend_reg_dev_count(server))]
                devices.extend(self._rpc[endpoint])
        return devices

    @property
    def has_rpc_devices(self) -> bool:
        """Whether any RPC worker's devices are in ggml's registry (they stay there for good)."""
        return bool(self._rpc)


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RpcError(f"cannot reach the RPC worker at {endpoint}: {exc.strerror or exc}",
                       hint=f"Start one there with `ggufchat rpc-worker --host {host} --port {port}`, "
                            "and check that no firewall is in the way.") from None


BACKEND = Backend()
