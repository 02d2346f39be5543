"""Facts about this machine that need no llama.cpp: `ggufchat build` uses them while llama_cpp is
missing or broken, so they cannot live in the engine."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
