"""Prompt parity with llama.cpp's own llama-server: the same Qwen2.5 GGUF and the same OpenAI chat request
(with tools, with a tool-call history, without either) give the same prompt text and the same prompt
tokens in ggufchat as in llama-server.

llama-server's answers are recorded below, so the comparison runs on every checkout (`make test` on a
clean clone has no .build/). Where `make llama-tools` has built llama-server, the test also starts it
and compares with it live, and checks that the recording still holds.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ggufchat.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
LLAMA_SERVER = ROOT / ".build" / "llama.cpp" / "bin" / "llama-server"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp_c": 18, "sky": "clear"}'},
    {"role": "user", "content": "Thanks. And in Zürich?"},
]
PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}]
REQUESTS = {
    "tools": {"messages": HISTORY, "tools": [WEATHER]},
    "history": {"messages": HISTORY},
    "plain": {"messages": PLAIN},
}

_TURNS = ('<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n'
          '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          '</tool_call><|im_end|>\n'
          '<|im_start|>user\n<tool_response>\n{"temp_c": 18, "sky": "clear"}\n</tool_response><|im_end|>\n'
          '<|im_start|>user\nThanks. And in Zürich?<|im_end|>\n<|im_start|>assistant\n')
# Measured on 2026-12-01 with llama-server built by `make llama-tools` from the llama.cpp vendored in
# llama-cpp-python 0.3.36 (`llama-server --version`: 0.5.0-dev, commit 0c1e57098bba), started as
# `llama-server -m qwen2.5-coder-0.5b.gguf --jinja -c 4096 -np 1`: POST /apply-template (the prompt),
# POST /tokenize of that prompt with parse_special (the ids: their count and the first 16 hex digits of
# the sha256 of their JSON list), POST /v1/chat/completions with max_tokens 1 (usage.prompt_tokens).
RECORDED = {
    "tools": {
        "prompt": (
            '<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the '
            'user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
            '{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for '
            'a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": '
            '"City name"}}, "required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object with '
            'function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
            '<function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' + _TURNS),
        "prompt_tokens": 230, "ids_sha256": "8337f4d0af986dc9"},
    "history": {
        "prompt": "<|im_start|>system\nYou are terse.<|im_end|>\n" + _TURNS,
        "prompt_tokens": 88, "ids_sha256": "bd50d3595c5eca01"},
    "plain": {
        "prompt": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                   "Hello!<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"),
        "prompt_tokens": 33, "ids_sha256": "17191db68c9ccd09"},
}


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def llama_server(qwen_path, tmp_path_factory):
    """The port of a live llama-server on the Qwen model, or None where `make llama-tools` has not built it."""
    if not LLAMA_SERVER.exists():
        yield None
        return
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(qwen_path), "--jinja", "-c", "4096", "-np", "1",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server did not come up: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(port: int, body: dict) -> dict:
    prompt = post(port, "/apply-template", body)["prompt"]
    ids = post(port, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    usage = post(port, "/v1/chat/completions", {**body, "max_tokens": 1})["usage"]
    return {"prompt": prompt, "prompt_tokens": usage["prompt_tokens"], "ids": ids}


def ggufchat_prompt(engine: Engine, body: dict) -> tuple[str, list[int]]:
    tools = body.get("tools")
    return engine.render_chat(body["messages"], tools=tools), engine.chat_tokens(body["messages"], tools=tools)


@pytest.mark.parametrize("case", list(REQUESTS))
def test_prompt_and_tokens_match_llama_server(qwen_engine: Engine, llama_server, case: str):
    body, recorded = REQUESTS[case], RECORDED[case]
    text, ids = ggufchat_prompt(qwen_engine, body)
    assert text == recorded["prompt"]
    assert len(ids) == recorded["prompt_tokens"]
    assert ids_digest(ids) == recorded["ids_sha256"]
    if llama_server is None:
        return  # no llama-server binary (a clean clone): the recording above is the reference
    live = measure(llama_server, body)
    assert text == live["prompt"]
    assert ids == live["ids"]
    assert len(ids) == live["prompt_tokens"]
    # The recording still describes this llama-server (re-record above when llama.cpp is updated).
    assert (live["prompt"], live["prompt_tokens"], ids_digest(live["ids"])) == (
        recorded["prompt"], recorded["prompt_tokens"], recorded["ids_sha256"])
