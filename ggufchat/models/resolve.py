"""Turn what a user typed as MODEL into a GGUF path: a file, a cached model, or the embedded default."""

from __future__ import annotations

from pathlib import Path

from ggufchat.errors import ModelNotFound
from ggufchat.models.catalog import looks_like_remote, parse_spec
from ggufchat.models.embedded import NAME as EMBEDDED_NAME
from ggufchat.models.embedded import embedded_model_path
from ggufchat.models.store import Store
from ggufchat.settings import Settings, load_settings


def canonical_name(spec: str) -> str:
    """The cache name of a remote spec: 'qwen2-7b-instruct:q5_k_m', 'hf://owner/repo:q4_0', ..."""
    return parse_spec(spec).display


def resolve_model(spec: str | None, settings: Settings | None = None) -> Path:
    """None means GGUFCHAT_MODEL or the embedded default; then a path; then the model cache."""
    settings = settings or load_settings()
    spec = spec or settings.model
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    store = Store(settings.home)
    cached = store.find(spec)
    if cached is None and looks_like_remote(spec):
        cached = store.find(canonical_name(spec))
        if cached is None:
            offline = " (offline: only the cache is used)" if settings.offline else ""
            raise ModelNotFound(f"{spec} is not downloaded yet{offline}",
                                hint=f"Run `ggufchat download {spec}` first (or add --pull).")
    if cached is not None:
        return cached.path
    if path.exists():
        raise ModelNotFound(f"{spec} is not a file", hint="Pass the path of a .gguf file.")
    raise ModelNotFound(f"no model file at {spec}, and no cached model of that name",
                        hint="`ggufchat list` shows cached models; pass a .gguf path or a catalog alias.")
