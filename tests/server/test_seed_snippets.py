"""The seeds' curl and python-requests snippets, verbatim except for host and port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import requests

from tests.server.conftest import post, serve

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"


def _seed_block(name_prefix: str, start: str) -> str:
    """The fenced code block of a seed file that starts with `start`."""
    text = next(SEEDS.glob(name_prefix + "_*.txt")).read_text(encoding="utf-8")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if b.lstrip().startswith(start))


def _retarget(snippet: str, url: str) -> str:
    return snippet.replace("http://127.0.0.1:6006", url)


def test_seed_curl_post_root(url: str):
    snippet = _retarget(_seed_block("001", "curl -X POST"), url)
    out = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == 200 and answer["response"].strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])


def test_seed_python_requests_snippet(url: str):
    snippet = _retarget(_seed_block("002", "import requests"), url)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # get_completion('你好，你是谁？') printed the model's reply


def test_seed_vllm_curl_completions(url: str):
    snippet = _seed_block("003", "curl http://").replace(
        "http://inference-api-77.colossal-ai.platform.luchentech.com", url)
    out = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=120)
    body = json.loads(out.stdout)
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_history_in_both_shapes_reaches_the_model(url: str):
    # The model can only answer with the name if the history was put in the prompt.
    as_messages = [{"role": "user", "content": "My name is Zorblax."},
                   {"role": "assistant", "content": "Nice to meet you, Zorblax!"}]
    as_pairs = [["My name is Zorblax.", "Nice to meet you, Zorblax!"]]
    answers = []
    for history in (as_messages, as_pairs):
        r = post(url, "/", {"prompt": "What is my name?", "history": history, "temperature": 0, "max_tokens": 30})
        assert r.status_code == 200, r.text
        answers.append(r.json()["response"])
    assert answers[0] == answers[1]
    assert "Zorblax" in answers[0]


def test_everai_chat_route_get_and_post_with_bearer(engine):
    with serve(engine, api_keys=["s3cret"]) as url:
        snippet = _seed_block("000", "curl -X POST").splitlines()[0]
        snippet = snippet.replace("<your_token>", "s3cret").replace(
            "https://everai.expvent.com/api/routes/v1/<your namespace>/<your app name>", url)
        out = subprocess.run(["bash", "-c", snippet + " -i"], capture_output=True, text=True, timeout=120)
        assert "200 OK" in out.stdout.splitlines()[0]
        assert "content-type: text/plain; charset=utf-8" in out.stdout.lower()
        assert out.stdout.split("\n\n", 1)[1].strip()  # the reply after the headers
        r = requests.get(url + "/chat", params={"prompt": "who are you"}, timeout=120,
                         headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text.strip()
        assert requests.get(url + "/chat", params={"prompt": "who are you"}, timeout=30).status_code == 401
