"""A small reader for GGUF headers: metadata and tensor layout, without loading weights.

It exists so that a bad file is rejected with a clear message before llama.cpp sees it (llama.cpp
aborts the process on some malformed files), and so that `list`/`show` can read metadata cheaply.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ggufchat.errors import InvalidModelFile

MAGIC = b"GGUF"

# GGUF metadata value types.
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block). Types not listed are accepted, but
# their data bounds are left for llama.cpp to check.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

_TYPE_IDS = {name.lower(): type_id for type_id, (name, _, _) in GGML_TYPES.items()}


def ggml_type(name: str) -> tuple[int, float]:
    """(ggml type id, bytes per element) of a type named as llama.cpp's flags name it: 'f16', 'q8_0'..."""
    type_id = _TYPE_IDS[name.lower()]
    _, block, size = GGML_TYPES[type_id]
    return type_id, size / block


# Arrays longer than this (token lists, merges) are skipped and stored as their length only.
_MAX_ARRAY_KEEP = 64
_MAX_STRING = 1 << 26
_MAX_COUNT = 1 << 32


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def nbytes(self) -> int | None:
        info = GGML_TYPES.get(self.type_id)
        if info is None:
            return None
        _, block, size = info
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def context_length(self) -> int | None:
        arch = self.architecture
        return self.metadata.get(f"{arch}.context_length") if arch else None

    @property
    def parameter_count(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh = fh
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise InvalidModelFile(f"{self.path} is truncated: its GGUF header ends early")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise InvalidModelFile(f"{self.path} is corrupt: a metadata string claims {n} bytes")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if count > _MAX_COUNT:
                raise InvalidModelFile(f"{self.path} is corrupt: an array claims {count} items")
            if count > _MAX_ARRAY_KEEP:
                self.skip_array(etype, count)
                return _SkippedArray(count)
            return [self.value(etype) for _ in range(count)]
        raise InvalidModelFile(f"{self.path} is corrupt: unknown metadata type {vtype}")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self.fh.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
        elif etype == _STRING:
            for _ in range(count):
                n = self.unpack("<Q")
                if n > _MAX_STRING:
                    raise InvalidModelFile(f"{self.path} is corrupt: a metadata string claims {n} bytes")
                self.fh.seek(n, 1)
        else:
            for _ in range(count):
                self.value(etype)


class _SkippedArray(list):
    """Stands in for a long array: empty, but remembers how many items the file holds."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def __repr__(self) -> str:
        return f"<array of {self.count} items>"


def read_gguf(path: str | Path, *, check_bounds: bool = True) -> GGUFInfo:
    """Parse a GGUF header; raise InvalidModelFile for anything that is not a complete GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from exc
    with fh:
        r = _Reader(fh, path)
        head = fh.read(4)
        if head != MAGIC:
            raise InvalidModelFile(
                f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF')",
                hint="ggufchat runs .gguf models; convert others with llama.cpp's convert_hf_to_gguf.py.",
            )
        version = r.unpack("<I")
        if version not in (2, 3):
            raise InvalidModelFile(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
        n_tensors = r.unpack("<Q")
        n_kv = r.unpack("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise InvalidModelFile(f"{path} is corrupt: implausible tensor or key count")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                raise InvalidModelFile(f"{path} is corrupt: tensor {name} has {n_dims} dimensions")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            tensors.append(TensorInfo(name, shape, r.unpack("<I"), r.unpack("<Q")))
        align = int(metadata.get("general.alignment", 32)) or 32
        pos = fh.tell()
        data_offset = (pos + align - 1) // align * align
    info = GGUFInfo(path, version, metadata, tensors, data_offset, size)
    if check_bounds:
        _check_bounds(info)
    return info


def _check_bounds(info: GGUFInfo) -> None:
    end = info.data_offset
    for t in info.tensors:
        nbytes = t.nbytes
        if nbytes is not None:
            end = max(end, info.data_offset + t.offset + nbytes)
    if end > info.file_size:
        raise InvalidModelFile(
            f"{info.path} is truncated: its tensors need {end} bytes but the file has {info.file_size}",
            hint="The download was probably cut short; download the file again.",
        )
