"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), written atomically."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from ggufchat.engine.backend import BACKEND
from ggufchat.engine.loader import default_threads
from ggufchat.errors import InvalidParameter, ModelLoadError
from ggufchat.models.gguf import read_gguf

TYPES = {name[len("LLAMA_FTYPE_MOSTLY_"):].lower(): getattr(llama_cpp, name)
         for name in dir(llama_cpp) if name.startswith("LLAMA_FTYPE_MOSTLY_")}
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def check_args(src: Path, dst: Path, qtype: str) -> str:
    """Raise a clear error for a bad type or input before any work starts; return the type key."""
    key = qtype.lower()
    if key not in TYPES:
        raise InvalidParameter(f"unknown quant type {qtype!r}; choose one of: {', '.join(sorted(TYPES))}",
                               param="type")
    read_gguf(src)  # llama.cpp aborts on some malformed files; refuse them here
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidParameter("the output must be a different file from the input")
    return key


def quantize(src: Path, dst: Path, qtype: str, *, threads: int = 0,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `dst` as `qtype`; nothing appears at `dst` unless llama.cpp finished the whole file."""
    key = check_args(src, dst, qtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[key]
    params.nthread = threads or default_threads()
    params.allow_requantize = True  # e.g. the embedded Q4_1 model to Q4_0; llama.cpp warns about quality

    def on_line(line: str) -> None:
        m = _PROGRESS.search(line)
        if m and progress is not None:
            progress(int(m.group(1)), int(m.group(2)))

    BACKEND.ensure_ready()
    BACKEND.log.take_recent()
    with BACKEND.log.listening(on_line):
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if status != 0:
        tmp.unlink(missing_ok=True)
        detail = "; ".join(BACKEND.log.take_recent()[-3:])
        raise ModelLoadError(f"llama.cpp could not quantize {src} to {key}" + (f": {detail}" if detail else ""))
    os.replace(tmp, dst)
    return dst
