"""`ggufchat quantize`: llama.cpp's quantizer on the embedded model."""

from __future__ import annotations

from ggufchat.models.gguf import read_gguf
from tests.conftest import run_cli


def test_quantize_to_a_smaller_type_that_loads_and_answers(tmp_path, model_path):
    out = tmp_path / "smol-q4_0.gguf"
    result = run_cli("quantize", str(model_path), str(out), "q4_0")
    assert result.returncode == 0, result.stderr
    assert "272/272" in result.stderr  # the progress bar went to stderr, tensor by tensor
    assert result.stdout.strip().startswith(str(out))
    assert out.stat().st_size < model_path.stat().st_size
    info = read_gguf(out)
    assert info.get("general.file_type") == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    answer = run_cli("chat", str(out), "-p", "What is 2+2?", "-n", "12", "--temp", "0")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() and "Q4_0" in answer.stderr
    assert not list(tmp_path.glob(".*.partial"))


def test_quantize_errors_are_one_line(tmp_path, model_path):
    bad_type = run_cli("quantize", str(model_path), str(tmp_path / "x.gguf"), "q9_z")
    assert bad_type.returncode == 1 and bad_type.stderr.startswith("Error: unknown quant type")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    bad_input = run_cli("quantize", str(junk), str(tmp_path / "y.gguf"), "q4_0")
    assert bad_input.returncode == 1 and "not a GGUF file" in bad_input.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
