"""What this machine's llama.cpp build and devices are, for tests whose expectations depend on them.

The suite runs on CPU-only machines and on the GPU machines ggufchat is for. A test that would
otherwise assume "CPU only" asks here instead, and expects what the installed library really reports.
Everything is read through the engine's own facade (ggufchat.engine.devices), the way the code under
test reads it; the selection rules below are the documented ones (`ggufchat rpc-worker --help`, the
loader's "discrete GPUs, else integrated ones").
"""

from __future__ import annotations

import functools

from ggufchat.engine.devices import Device, gpu_backends, list_devices

OFFLOAD_KINDS = ("gpu", "igpu")


@functools.cache
def devices() -> tuple[Device, ...]:
    """This machine's ggml devices in registry order (CPU, CUDA0, ...); no RPC worker's."""
    return tuple(d for d in list_devices() if not d.remote)


def device_names() -> list[str]:
    return [d.name for d in devices()]


def gpu_build() -> bool:
    """Whether this build has a backend that offloads off the host (CUDA, Vulkan, Metal, ...)."""
    return bool(gpu_backends())


def offload_names() -> list[str]:
    """Where a local load puts layers: the discrete GPUs, else the integrated ones; none on a CPU-only
    machine (the load is then "CPU only")."""
    gpus = [d.name for d in devices() if d.kind == "gpu"]
    return gpus or [d.name for d in devices() if d.kind == "igpu"]


def worker_device_names() -> list[str]:
    """What `ggufchat rpc-worker` serves without --device: every GPU, else the CPU."""
    gpus = [d.name for d in devices() if d.kind in OFFLOAD_KINDS]
    return gpus or [d.name for d in devices() if d.kind == "cpu"]
