"""The local model cache under GGUFCHAT_HOME: one folder per model, a manifest written last.

    $GGUFCHAT_HOME/models/<slug>/manifest.json   name, source, repo, revision, files (sha256, size), time
    $GGUFCHAT_HOME/models/<slug>/<file>.gguf     the model file(s); every part of a split model
    $GGUFCHAT_HOME/downloads/...                 partial downloads (ours and the hub clients'), resumed next run
    $GGUFCHAT_HOME/downloads/locks/<slug>.lock   held by the one process downloading that model (empty files)

A model is only listed or loaded when its manifest exists and every file it names has the size the
manifest says: a half-written or unverified file is never mistaken for a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ggufchat.errors import GgufchatError, ModelNotFound

MANIFEST = "manifest.json"


@dataclass
class FileRecord:
    name: str
    size: int
    sha256: str | None = None


@dataclass
class Manifest:
    name: str
    source: str  # hf, ms, url, local
    repo: str | None
    revision: str | None
    files: list[FileRecord]
    commit: str | None = None
    verified: bool = False  # sha256 checked against the hub's
    downloaded_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> str:
        data = {**self.__dict__, "files": [f.__dict__ for f in self.files]}
        return json.dumps(data, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["files"] = [FileRecord(**f) for f in data["files"]]
        return cls(**data)


@dataclass
class CachedModel:
    manifest: Manifest
    folder: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def path(self) -> Path:
        """The file to load: the only file, or the first part of a split model."""
        return self.folder / self.manifest.files[0].name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files)


def slug(name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class Store:
    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        self.models_dir = self.home / "models"
        self.downloads_dir = self.home / "downloads"

    def lock_path(self, name: str) -> Path:
        """The lock a download of model `name` holds until it is installed (see hub.download)."""
        return self.downloads_dir / "locks" / f"{slug(name)}.lock"

    def models(self) -> list[CachedModel]:
        found = []
        if not self.models_dir.is_dir():
            return found
        for folder in sorted(self.models_dir.iterdir()):
            model = self._read(folder)
            if model is not None:
                found.append(model)
        return sorted(found, key=lambda m: m.name)

    def _read(self, folder: Path) -> CachedModel | None:
        try:
            manifest = Manifest.from_json((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        for f in manifest.files:
            p = folder / f.name
            if not p.is_file() or p.stat().st_size != f.size:
                return None
        return CachedModel(manifest, folder)

    def find(self, name: str) -> CachedModel | None:
        """By exact name, or by the name without its quant tag when one cached model has it."""
        models = self.models()
        for m in models:
            if m.name == name:
                return m
        base = [m for m in models if m.name.split(":")[0] == name]
        return base[0] if len(base) == 1 else None

    def get(self, name: str) -> CachedModel:
        model = self.find(name)
        if model is None:
            raise ModelNotFound(f"{name} is not in the model cache ({self.models_dir})",
                                hint="`ggufchat list` shows what is cached; `ggufchat download NAME` fetches it.")
        return model

    def install(self, manifest: Manifest, staged: dict[str, Path], *, move: bool = True) -> CachedModel:
        """Put verified files in place and write the manifest last, then swap the folder in atomically."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        final = self.models_dir / slug(manifest.name)
        work = self.models_dir / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
        work.mkdir()
        try:
            for record in manifest.files:
                src = staged[record.name]
                dst = work / record.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    shutil.move(str(src), dst)
                else:
                    shutil.copyfile(src, dst)
            (work / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        model = self._read(final)
        if model is None:  # pragma: no cover - only if the disk changed under us
            raise GgufchatError(f"installing {manifest.name} failed")
        return model

    def remove(self, name: str) -> CachedModel:
        model = self.get(name)
        trash = model.folder.with_name(f".{model.folder.name}.{uuid.uuid4().hex[:8]}.removing")
        os.replace(model.folder, trash)  # gone from the listing at once, even if the delete is slow
        shutil.rmtree(trash, ignore_errors=True)
        return model
