"""`ggufchat serve` as a user starts it: a real process, a real port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import requests

from tests.conftest import run_cli
from tests.engine.test_speculative import COPY_PROMPTS


def _start(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "serve", "--port", "0", *args], env=full_env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    match = re.search(r"on (http://\S+)", line)
    assert match, line
    proc.banner = line  # type: ignore[attr-defined]
    return proc, match.group(1)


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return err


def test_serve_answers_and_shuts_down_cleanly(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nfile-key\n")
    proc, url = _start("-np", "2", "--api-key-file", str(key_file), "--alias", "tiny",
                       env={"GGUFCHAT_MAX_QUEUE": "3"})
    try:
        _wait_ready(url)
        auth = {"Authorization": "Bearer file-key"}
        models = requests.get(url + "/v1/models", headers=auth, timeout=10).json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["n_parallel"] == 2
        r = requests.post(url + "/", json={"prompt": "Hi"}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == 200
        assert requests.post(url + "/", json={"prompt": "Hi"}, timeout=10).status_code == 401
        # n-gram drafts are on by default: a greedy reply that copies its prompt is drafted.
        body = {"messages": [{"role": "user", "content": COPY_PROMPTS[0]}], "temperature": 0, "max_tokens": 60}
        usage = requests.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60).json()["usage"]
        assert usage["completion_tokens_details"]["accepted_prediction_tokens"] > 10, usage
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_env_settings_are_listed_in_help():
    out = run_cli("serve", "--help").stdout
    for name in ("GGUFCHAT_PORT", "GGUFCHAT_API_KEY", "GGUFCHAT_PARALLEL", "GGUFCHAT_IDLE_UNLOAD"):
        assert name in out


def test_bad_model_is_one_error_line_before_listening(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    r = run_cli("serve", str(bad), "--port", "0")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "GGUF" in lines[0]


def test_port_in_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", str(port))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}")


def test_remote_alias_not_downloaded_offers_the_download(tmp_path):
    r = run_cli("serve", "qwen2-7b-instruct:q5_k_m", env={"GGUFCHAT_HOME": str(tmp_path), "GGUFCHAT_OFFLINE": "1"})
    assert r.returncode == 1
    assert "ggufchat download qwen2-7b-instruct:q5_k_m" in r.stderr
