"""Split a GGUF into llama.cpp's multi-file layout (what `llama-gguf-split --split` writes), for tests.

Each part is a GGUF of its own holding some of the tensors; every part carries split.no, split.count
and split.tensors.count, and the first also carries the model's metadata. llama.cpp loads the first
part and finds the others by name (PREFIX-0000N-of-0000M.gguf).
"""

from __future__ import annotations

import struct
from pathlib import Path

from ggufchat.models.gguf import GGUFInfo, _Reader, read_gguf

_U16, _I32 = 2, 5


def _kv_string(key: str) -> bytes:
    data = key.encode()
    return struct.pack("<Q", len(data)) + data


def _split_kvs(no: int, count: int, n_tensors: int) -> bytes:
    return (_kv_string("split.no") + struct.pack("<IH", _U16, no)
            + _kv_string("split.count") + struct.pack("<IH", _U16, count)
            + _kv_string("split.tensors.count") + struct.pack("<Ii", _I32, n_tensors))


def _raw_kvs(path: Path) -> tuple[bytes, int]:
    """The model's metadata section as raw bytes, and its key count."""
    with open(path, "rb") as fh:
        r = _Reader(fh, path)
        fh.seek(4 + 4 + 8)
        n_kv = r.unpack("<Q")
        start = fh.tell()
        for _ in range(n_kv):
            r.string()
            r.value(r.unpack("<I"))
        end = fh.tell()
        fh.seek(start)
        return fh.read(end - start), n_kv


def split_gguf(src: Path, out_dir: Path, prefix: str, parts: int) -> list[Path]:
    info: GGUFInfo = read_gguf(src)
    align = int(info.get("general.alignment", 32))
    kvs, n_kv = _raw_kvs(src)
    chunks = [info.tensors[i::parts] for i in range(parts)]
    paths = []
    with open(src, "rb") as fh:
        for no, tensors in enumerate(chunks):
            header = b"GGUF" + struct.pack("<I", info.version) + struct.pack("<Q", len(tensors))
            meta = (kvs if no == 0 else b"") + _split_kvs(no, parts, len(info.tensors))
            header += struct.pack("<Q", (n_kv if no == 0 else 0) + 3) + meta
            infos, blobs, offset = b"", [], 0
            for t in tensors:
                infos += _kv_string(t.name) + struct.pack("<I", len(t.shape))
                infos += b"".join(struct.pack("<Q", d) for d in t.shape)
                infos += struct.pack("<IQ", t.type_id, offset)
                fh.seek(info.data_offset + t.offset)
                data = fh.read(t.nbytes)
                pad = (-len(data)) % align
                blobs.append(data + b"\0" * pad)
                offset += len(data) + pad
            body = header + infos
            body += b"\0" * ((-len(body)) % align)
            path = out_dir / f"{prefix}-{no + 1:05d}-of-{parts:05d}.gguf"
            path.write_bytes(body + b"".join(blobs))
            paths.append(path)
    return paths
