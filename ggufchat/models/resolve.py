"""Turn what a user typed as MODEL into a GGUF path."""

from __future__ import annotations

from pathlib import Path

from ggufchat.errors import ModelNotFound
from ggufchat.models.embedded import NAME as EMBEDDED_NAME
from ggufchat.models.embedded import embedded_model_path


def resolve_model(spec: str | None) -> Path:
    """None (or the embedded model's name) means the embedded default; otherwise a path to a .gguf."""
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelNotFound(f"{spec} is not a file", hint="Pass the path of a .gguf file.")
    raise ModelNotFound(f"no model file at {spec}")
