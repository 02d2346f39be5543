"""A missing, truncated or non-GGUF file is a domain error with a clear message, never a crash."""

from __future__ import annotations

import pytest

from ggufchat.engine import Engine, LoadOptions
from ggufchat.errors import InvalidModelFile, ModelNotFound
from ggufchat.models.gguf import read_gguf
from tests.conftest import run_cli


def _load(path):
    return Engine(LoadOptions(model_path=path, n_ctx=256))


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFound):
        _load(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("<html>404 Not Found</html>")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        _load(p)


@pytest.mark.parametrize("keep", [3, 100, 3000, 20_000_000])
def test_truncated(tmp_path, model_path, keep):
    p = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        p.write_bytes(src.read(keep))
    with pytest.raises(InvalidModelFile, match="truncated|not a GGUF"):
        _load(p)


def test_corrupt_header_counts(tmp_path, model_path):
    data = bytearray(model_path.read_bytes()[:4096])
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile):
        _load(p)


def test_metadata_of_the_real_model(model_path):
    info = read_gguf(model_path)
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert "<|im_start|>" in info.chat_template
    assert 100e6 < info.parameter_count < 200e6


def test_cli_says_one_line_and_exits_1(tmp_path, model_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(model_path.read_bytes()[:5_000_000])
    result = run_cli("chat", str(p), "-p", "hi")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "truncated" in lines[0]
    assert "Traceback" not in result.stderr
