"""The compute devices ggml sees (CPU, CUDA GPUs, RPC servers), with their memory.

The llama-cpp-python bindings do not wrap ggml's device registry, so this reads it from the same
shared libraries llama_cpp loaded.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from ggufchat.engine.loader import init_backend

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass
class Device:
    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int
    backend: str = ""  # the ggml backend that owns it: CPU, CUDA, RPC, ...
    handle: int = field(default=0, repr=False, compare=False)  # ggml_backend_dev_t

    @property
    def remote(self) -> bool:
        return self.backend == "RPC"


def library_folder() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml) with the signatures used here: the registry, devices, backends."""
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


def list_devices(remote: Iterable[int] = ()) -> list[Device]:
    """This machine's devices, plus the RPC devices among `remote` (handles from engine/rpc.py).

    Other RPC devices registered in this process are left out and not queried: asking a worker
    that has gone away for its memory aborts the process inside ggml.
    """
    init_backend()
    base, reg = _libs()
    wanted = set(remote)
    out = []
    for i in range(reg.ggml_backend_dev_count()):
        dev = reg.ggml_backend_dev_get(i)
        backend = (base.ggml_backend_reg_name(base.ggml_backend_dev_backend_reg(dev)) or b"").decode()
        if backend == "RPC" and dev not in wanted:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(
            name=(base.ggml_backend_dev_name(dev) or b"").decode(),
            description=(base.ggml_backend_dev_description(dev) or b"").decode(),
            kind=_TYPES.get(base.ggml_backend_dev_type(dev), "other"),
            free_bytes=free.value,
            total_bytes=total.value,
            backend=backend,
            handle=dev,
        ))
    return out


def list_backends() -> list[str]:
    """The ggml backends this build registered (CPU, CUDA, RPC, ...)."""
    init_backend()
    base, reg = _libs()
    return [(base.ggml_backend_reg_name(reg.ggml_backend_reg_get(i)) or b"").decode()
            for i in range(reg.ggml_backend_reg_count())]


# Backends that run on the host: a build with only these cannot offload to a GPU, although
# llama_supports_gpu_offload() says yes whenever the RPC backend is compiled in.
HOST_BACKENDS = {"CPU", "RPC", "BLAS"}


def gpu_backends() -> list[str]:
    return [b for b in list_backends() if b not in HOST_BACKENDS]


def system_info() -> dict[str, object]:
    init_backend()
    gpus = gpu_backends()
    return {
        "system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
        "gpu_offload": bool(gpus),
        "gpu_backends": gpus,
        "rpc": bool(llama_cpp.llama_supports_rpc()),
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "max_devices": llama_cpp.llama_max_devices(),
    }
