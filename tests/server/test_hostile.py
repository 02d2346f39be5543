"""Hostile input over real HTTP: no single request may kill, break or stall the server (issue 14).

Every case here once crashed the process (SIGABRT, SIGSEGV), answered 500 and reset the connection, or
held the event loop for seconds. Each test ends by checking that the server still answers quickly.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from tests.server.conftest import post, serve

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _alive(url: str, within: float = 2.0) -> None:
    t0 = time.perf_counter()
    r = requests.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert time.perf_counter() - t0 < within


def _error(r: requests.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------- token ids from clients
@pytest.mark.parametrize("ids", [[931099052], [-1], [2**40], [1, 2, 49152]])
@pytest.mark.parametrize("extra", [{"echo": True}, {"echo": True, "stream": True}, {}])
def test_prompt_ids_outside_the_vocabulary(url: str, ids: list[int], extra: dict):
    r = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 1, **extra})
    error = _error(r)
    assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]
    _alive(url)


@pytest.mark.parametrize("ids", [[931099052], [-1], [2**63], [0, 10**12]])
def test_detokenize_ids_outside_the_vocabulary(url: str, ids: list[int]):
    assert _error(post(url, "/detokenize", {"tokens": ids}))["param"] == "tokens"
    _alive(url)


def test_valid_prompt_ids_are_echoed(url: str):
    ids = post(url, "/tokenize", {"content": "The sky is"}).json()["tokens"]
    r = post(url, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("The sky is")


# ---------------------------------------------------------------- grammars
GRAMMAR_BOMBS = {
    "maxLength 30000": {"type": "string", "maxLength": 30000},  # crashed: SIGSEGV in llama.cpp's parser
    "maxLength 100000": {"type": "string", "maxLength": 100000},
    "maxLength 10000": {"type": "string", "maxLength": 10000},  # was a 400 with an 80 KB grammar on stderr
    "maxItems 100000": {"type": "array", "items": {"type": "integer"}, "maxItems": 100000},
    "pattern a{0,100000}": {"type": "string", "pattern": "^a{0,100000}$"},
    "enum of 20000": {"enum": [f"value-{i}" for i in range(20000)]},  # stalled every stream for seconds
    "enum of 3000": {"enum": [f"v{i}" for i in range(3000)]},
}


@pytest.mark.parametrize("name", GRAMMAR_BOMBS)
def test_grammar_bombs_are_refused_before_llama_cpp(url: str, name: str, capfd):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": GRAMMAR_BOMBS[name]}}
    capfd.readouterr()
    error = _error(post(url, CHAT, {"messages": HI, "max_tokens": 4, "response_format": fmt}))
    assert error["param"] == "response_format"
    assert "this server allows" in error["message"]
    # llama.cpp prints a grammar it cannot parse to stderr; nothing may have reached its parser.
    assert "::=" not in capfd.readouterr().err
    _alive(url)


def test_a_bounded_schema_still_works(url: str):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 200}}}
    r = post(url, CHAT, {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 30,
                         "temperature": 0, "response_format": fmt})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), str)


# ---------------------------------------------------------------- lone surrogates
SURROGATE = '"a\\ud800b"'  # JSON text: an escaped lone surrogate
RAW = '"a\xed\xa0\x80b"'  # the raw bytes ED A0 80, which Python's JSON decoder lets through

SURROGATE_BODIES = {
    "chat content": (CHAT, '{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}'),
    "system content": (CHAT, '{"messages": [{"role": "system", "content": %s}, {"role": "user", "content": "hi"}],'
                             ' "max_tokens": 2}'),
    "content part": (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}],'
                           ' "max_tokens": 2}'),
    "stop": (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "stop": [%s], "max_tokens": 2}'),
    "completions prompt": ("/v1/completions", '{"prompt": %s, "max_tokens": 2, "echo": true}'),
    "POST / prompt": ("/", '{"prompt": %s, "max_tokens": 2}'),
    "POST / history": ("/", '{"prompt": "hi", "history": [[%s, "ok"]], "max_tokens": 2}'),
    "POST /chat": ("/chat", '{"prompt": %s}'),
    "tokenize": ("/tokenize", '{"content": %s, "with_pieces": true}'),
}


@pytest.mark.parametrize("escape", [SURROGATE, RAW], ids=["escaped", "raw bytes"])
@pytest.mark.parametrize("name", SURROGATE_BODIES)
def test_lone_surrogates_become_replacement_characters(url: str, name: str, escape: str):
    path, template = SURROGATE_BODIES[name]
    data = (template % escape).encode("utf-8", "surrogatepass") if escape == SURROGATE else \
        (template % escape).encode("latin-1")
    with requests.Session() as session:  # one pooled connection: it must survive the request
        r = session.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)
        assert r.status_code == 200, r.text
        if name == "completions prompt":
            assert r.json()["choices"][0]["text"].startswith("a\ufffdb")
        if name == "tokenize":
            replaced = session.post(url + path, json={"content": "a\ufffdb", "with_pieces": True}, timeout=30)
            assert r.json()["tokens"] == replaced.json()["tokens"]
            assert "".join(p["piece"] for p in r.json()["tokens"]) == "a\ufffdb"
        assert session.get(url + "/health", timeout=10).status_code == 200


def test_other_invalid_utf8_is_a_json_error(url: str):
    r = requests.post(url + CHAT, data=b'{"messages": [{"role": "user", "content": "a\xffb"}]}',
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert _error(r)["code"] == "invalid_json"


# ---------------------------------------------------------------- sizes, counts, shapes
def test_too_many_messages(url: str):
    many = {"messages": [{"role": "user", "content": "hi"}] * 5000, "max_tokens": 1}
    error = _error(post(url, CHAT, many))
    assert error["param"] == "messages" and "at most 2048" in error["message"]
    error = _error(post(url, "/", {"prompt": "hi", "history": [["a", "b"]] * 3000}))
    assert error["param"] == "history"


@pytest.mark.parametrize("seed, status", [(2**32, 400), (2**63, 400), (-2, 400), (2**32 - 1, 200), (-1, 200)])
def test_seed_must_fit_32_bits(url: str, seed: int, status: int):
    r = post(url, CHAT, {"messages": HI, "max_tokens": 1, "seed": seed})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "seed"


def test_deeply_nested_json_is_a_json_error(url: str):
    body = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = requests.post(url + CHAT, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert _error(r)["code"] == "invalid_json"
    _alive(url)


def test_a_body_that_is_not_json_is_refused(url: str):
    r = requests.post(url + CHAT, data='{"messages": []}', headers={"Content-Type": "text/plain"}, timeout=30)
    assert _error(r, 415)["code"] == "unsupported_media_type"


# ---------------------------------------------------------------- nothing heavy on the event loop
def _heavy_requests() -> dict[str, tuple[str, bytes, int]]:
    messages = json.dumps({"messages": [{"role": "user", "content": "hi there"}] * 110_000},
                          separators=(",", ":")).encode()  # 3.9 MB, under the 4 MiB body limit
    words = ("lorem ipsum dolor sit amet " * 120_000)[: 3 << 20]
    return {
        # (path, body, expected status)
        "110k messages": (CHAT, messages, 400),
        "/tokenize 3 MB with pieces": ("/tokenize", json.dumps({"content": words, "with_pieces": True}).encode(),
                                       200),
        "a 3.9 MiB prompt": ("/v1/completions", json.dumps({"prompt": "x " * (1_950_000)}).encode(), 400),
        "a 3 MiB chat message": (CHAT, json.dumps({"messages": [{"role": "user", "content": words}]}).encode(),
                                 400),
    }


def test_big_requests_do_not_stall_other_clients(url: str):
    """While each big request is read, parsed, rendered and tokenized, /health keeps answering."""
    for name, (path, body, status) in _heavy_requests().items():
        result: dict = {}

        def send(path: str = path, body: bytes = body, result: dict = result) -> None:
            t0 = time.perf_counter()
            r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=300)
            result.update(status=r.status_code, seconds=time.perf_counter() - t0)

        worker = threading.Thread(target=send)
        worker.start()
        latencies = []
        with requests.Session() as session:
            while worker.is_alive():
                t0 = time.perf_counter()
                assert session.get(url + "/health", timeout=10).status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)
        worker.join()
        assert result["status"] == status, name
        # Held on the event loop, these took 0.4-5.5 s; /health must stay far below that (the bound
        # is loose because this 2-core machine also runs the request itself and the test).
        assert max(latencies) < 0.5, (name, result, max(latencies))
        print(f"{name}: {result['seconds']:.2f} s, /health max {max(latencies) * 1000:.0f} ms over "
              f"{len(latencies)} probes")


# ---------------------------------------------------------------- clients that go away
def test_aborted_requests_give_their_queue_places_back(engine):
    """Clients that send a request and leave at once must not make the next client get 429 while the
    engine is busy with a long prefill."""
    with serve(engine, n_parallel=2, max_queue=2) as url:
        long_prompt = json.dumps({"prompt": "word " * 1500, "max_tokens": 200}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(long_prompt)).encode() + b"\r\n\r\n" + long_prompt)
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
                sock.sendall(request)
        time.sleep(0.5)  # the server notices the disconnects
        r = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while requests.get(url + "/health", timeout=10).json()["slots_processing"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests.get(url + "/health", timeout=10).json()["slots_processing"] == 0


# ---------------------------------------------------------------- a failing engine
def test_an_engine_failure_makes_the_server_unhealthy_not_silent(model_path):
    from ggufchat.engine import Engine, LoadOptions

    engine = Engine(LoadOptions(model_path=model_path, n_seq_max=2, n_ctx=1024))
    try:
        with serve(engine) as url:
            body = {"messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 500,
                    "stream": True, "temperature": 0}
            with requests.post(url + CHAT, json=body, stream=True, timeout=60) as r:
                lines = r.iter_lines(decode_unicode=True)
                assert next(line for line in lines if line).startswith("data: ")

                def broken_step(batch) -> None:
                    raise RuntimeError("injected failure")

                engine.scheduler._step = broken_step  # the next decode step raises inside the engine thread
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2].removeprefix("data: "))["error"]
            assert "injected failure" in error["message"] and error["code"] == "unavailable"

            health = requests.get(url + "/health", timeout=10)
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert "injected failure" in health.json()["error"]["message"]
            for stream in (False, True):
                r = post(url, CHAT, {"messages": HI, "max_tokens": 2, "stream": stream})
                assert _error(r, 503)["code"] == "unavailable"
                assert "restart the server" in r.json()["error"]["message"]
    finally:
        engine.close()
