"""Fixtures for download tests: both hub clients kept away from ~/.cache and real endpoints, and a fake hub."""

from __future__ import annotations

import pytest

from tests.hubserver import FakeHub

HF_REPO = "Qwen/Qwen2-7B-Instruct-GGUF"  # the catalog's repos for qwen2-7b-instruct
MS_REPO = "qwen/Qwen2-7B-Instruct-GGUF"
QUANT_FILE = "qwen2-7b-instruct-q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    import modelscope_hub.config

    # modelscope_hub builds one process-wide config from the environment on first use; drop it.
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)


@pytest.fixture(scope="module")
def gguf(model_path) -> bytes:
    """The embedded model's bytes: a real GGUF (92 MiB), big enough to cut mid-file."""
    return model_path.read_bytes()


@pytest.fixture
def hub(gguf):
    """Both catalog repos of qwen2-7b-instruct on the fake hub, with the real model as its q4_1 file."""
    with FakeHub() as h:
        for repo in (HF_REPO, MS_REPO):
            h.add_file(repo, QUANT_FILE, gguf)
            h.add_file(repo, "qwen2-7b-instruct-q8_0.gguf", gguf[:1000])
            h.add_file(repo, "README.md", b"# readme")
        yield h
