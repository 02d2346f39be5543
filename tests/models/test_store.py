"""The model cache: install, list, show, rm, and every verb resolving cached names."""

from __future__ import annotations

import json

import pytest

from ggufchat.errors import InvalidParameter
from ggufchat.models.catalog import parse_spec, pick_files, quant_of
from ggufchat.models.store import FileRecord, Manifest, Store, sha256_file
from tests.conftest import run_cli

NAME = "hf://test-org/SmolLM2-GGUF:q4_1"


@pytest.fixture
def home(tmp_path, model_path):
    store = Store(tmp_path)
    manifest = Manifest(NAME, "hf", "test-org/SmolLM2-GGUF", "main",
                        [FileRecord(model_path.name, model_path.stat().st_size, sha256_file(model_path))],
                        verified=True)
    store.install(manifest, {model_path.name: model_path}, move=False)
    return tmp_path


def env(home):
    return {"GGUFCHAT_HOME": str(home)}


def test_list_shows_metadata(home):
    result = run_cli("list", "--json", env=env(home))
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    row = rows[NAME]
    assert row["architecture"] == "llama" and row["context_length"] == 8192
    assert row["quant"] == "q4_1" and 100e6 < row["parameters"] < 200e6
    assert rows["smollm2-135m-instruct:q4_1"]["source"] == "embedded"
    human = run_cli("list", env=env(home))
    assert NAME in human.stdout and "llama" in human.stdout


def test_cached_name_works_for_chat_and_show(home):
    result = run_cli("chat", NAME, "-p", "Hi", "-n", "4", "--temp", "0", env=env(home))
    assert result.returncode == 0, result.stderr
    assert str(home) in result.stderr  # the model line names the cached file
    shown = run_cli("show", NAME, "--template", env=env(home))
    assert "<|im_start|>" in shown.stdout
    full = run_cli("show", NAME, env=env(home))
    assert "general.architecture = llama" in full.stdout


def test_rm_then_the_name_asks_for_a_download(home):
    result = run_cli("rm", NAME, env=env(home))
    assert result.returncode == 0 and "removed" in result.stdout
    assert not Store(home).models()
    again = run_cli("chat", NAME, "-p", "Hi", env=env(home))
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"Error: {NAME} is not downloaded yet. Run `ggufchat download {NAME}` first (or add --pull)."]
    missing = run_cli("rm", NAME, env=env(home))
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ")


def test_incomplete_models_are_never_listed(home):
    store = Store(home)
    (model,) = store.models()
    # A file cut short after the manifest was written (disk trouble, a hand edit): not a model.
    with open(model.path, "r+b") as fh:
        fh.truncate(1000)
    assert store.models() == []
    # A folder with files but no manifest (a crash mid-install): not a model either.
    partial = home / "models" / ".x.partial"
    partial.mkdir()
    (partial / "a.gguf").write_bytes(b"GGUF")
    assert store.models() == []


def test_spec_parsing_and_quant_pick():
    assert parse_spec("qwen2-7b-instruct:Q5_K_M").display == "qwen2-7b-instruct:q5_k_m"
    assert parse_spec("ms://qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q5_k_m.gguf").filename == \
        "qwen2-7b-instruct-q5_k_m.gguf"
    with pytest.raises(InvalidParameter, match="unknown model") as info:
        parse_spec("nonsense-model")
    assert "hf://OWNER/REPO" in info.value.hint
    listing = ["README.md", "m-q4_k_m.gguf", "m-q5_k_m.gguf", "m-q8_0-00001-of-00002.gguf",
               "m-q8_0-00002-of-00002.gguf"]
    assert pick_files(listing, "Q5_K_M".lower(), "r") == ["m-q5_k_m.gguf"]
    assert pick_files(listing, "q8_0", "r") == ["m-q8_0-00001-of-00002.gguf", "m-q8_0-00002-of-00002.gguf"]
    with pytest.raises(InvalidParameter, match="offers: q4_k_m, q5_k_m, q8_0"):
        pick_files(listing, "q4_k", "r")
    with pytest.raises(InvalidParameter, match="several files"):
        pick_files(listing, None, "r")
    assert quant_of("Meta-Llama-3-8B-Instruct.Q4_K_M.gguf") == "q4_k_m"
