"""Route llama.cpp's log through Python logging, and keep its recent warnings for error messages.

llama.cpp explains a failed load only in its log (e.g. "failed to read magic"); the loader puts those
lines into the exception it raises instead of letting them scroll past on stderr.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading

import llama_cpp

logger = logging.getLogger("ggufchat.llama")

# ggml_log_level in the vendored ggml: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5.
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_recent: collections.deque[str] = collections.deque(maxlen=16)
_lock = threading.Lock()
_last_level = logging.DEBUG
_installed = False
_listeners: list = []  # callables taking each log line, e.g. a progress bar during quantize


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    global _last_level
    # Level 5 continues the previous line.
    py_level = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level = py_level
    line = text.decode("utf-8", errors="replace").rstrip("\n")
    if not line:
        return
    if py_level >= logging.WARNING:
        with _lock:
            _recent.append(line.strip())
    for listener in list(_listeners):
        listener(line)
    logger.log(py_level, line)


def install() -> None:
    global _installed
    if not _installed:
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        _installed = True


def add_listener(fn) -> None:
    _listeners.append(fn)


def remove_listener(fn) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def take_recent() -> list[str]:
    """Return and forget the warnings and errors llama.cpp logged since the last call."""
    with _lock:
        lines = list(_recent)
        _recent.clear()
    return lines
