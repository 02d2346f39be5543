"""The compute devices ggml sees (CPU, CUDA GPUs, RPC servers), with their memory, and what this build
of llama.cpp supports. Read from ggml's device registry through engine/backend.py."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import llama_cpp

from ggufchat.engine.backend import BACKEND, library_folder

__all__ = ["Device", "gpu_backends", "library_folder", "list_backends", "list_devices", "system_info"]

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

    def report(self) -> dict[str, object]:
        """Its fields for people and JSON, without the ggml handle (meaningless outside this process)."""
        return {k: v for k, v in asdict(self).items() if k != "handle"}


def list_devices(remote: Iterable[int] = ()) -> list[Device]:
    """This machine's devices, plus the RPC devices among `remote` (handles from engine/rpc.py).

    Other RPC devices registered in this process are left out and not queried: asking a worker
    that has gone away for its memory aborts the process inside ggml.
    """
    BACKEND.ensure_ready()
    base, reg = BACKEND.libs
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
    BACKEND.ensure_ready()
    base, reg = BACKEND.libs
    return [(base.ggml_backend_reg_name(reg.ggml_backend_reg_get(i)) or b"").decode()
            for i in range(reg.ggml_backend_reg_count())]


# Backends that run on the host: a build with only these cannot offload to a GPU, although
# llama_supports_gpu_offload() says yes whenever the RPC backend is compiled in.
HOST_BACKENDS = {"CPU", "RPC", "BLAS"}


def gpu_backends() -> list[str]:
    return [b for b in list_backends() if b not in HOST_BACKENDS]


def system_info() -> dict[str, object]:
    BACKEND.ensure_ready()
    gpus = gpu_backends()
    return {
        "system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
        "gpu_offload": bool(gpus),
        "gpu_backends": gpus,
        "rpc": bool(llama_cpp.llama_supports_rpc()),
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "max_devices": llama_cpp.llama_max_devices(),
    }
