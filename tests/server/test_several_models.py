"""One server, several real models (SmolLM2-135M and Qwen2.5-Coder-0.5B), driven by the official openai
and ollama clients: each request answered by the model it names, loads on first use, eviction under a
budget of one model, a busy model never evicted, keep_alive, per-model metrics, and a long stream on one
model undisturbed while another loads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ollama
import openai
import pytest
import requests

from ggufchat.engine import Engine, LoadOptions
from ggufchat.engine.describe import describe
from ggufchat.engine.loader import estimate_memory
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.server.pool import Catalog, ModelEntry
from tests.server.conftest import metric, running, wait_for

HI = [{"role": "user", "content": "Say hello."}]
LONG = {"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "extra_body": {"ignore_eos": True}}


class Loads:
    """Counts each model's loads, as the server's factories run them."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    def entry(self, name: str, path: Path, *, n_ctx: int = 2048, aliases: tuple[str, ...] = (),
              keep_alive: float | None = None) -> ModelEntry:
        load = LoadOptions(model_path=path, n_seq_max=2, n_ctx=n_ctx, seed=0)

        def factory() -> Engine:
            self.count[name] = self.count.get(name, 0) + 1
            return Engine(load)

        return ModelEntry(name, path, factory, n_parallel=2, aliases=aliases, keep_alive=keep_alive,
                          memory=lambda: estimate_memory(load), describe=lambda fim: describe(load, fim=fim))


@contextmanager
def several(entries: list[ModelEntry], *, max_loaded: int = 0, memory_budget: int = 0,
            **config) -> Iterator[str]:
    catalog = Catalog(discover=lambda: list(entries), default=entries[0].name, max_loaded=max_loaded,
                      memory_budget=memory_budget)
    app = create_app(ServerConfig(model_id=entries[0].name, n_parallel=2, **config), catalog=catalog)
    with running(app) as url:
        assert wait_for(lambda: requests.get(url + "/health", timeout=5).status_code == 200, 60)
        yield url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _loaded(url: str) -> list[str]:
    return sorted(m["name"] for m in requests.get(url + "/api/ps", timeout=10).json()["models"])


def test_each_request_is_answered_by_the_model_it_names(model_path, qwen_path, engine, qwen_engine):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path, aliases=("coder",))]) as url:
        client = _client(url)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"smol", "qwen"}
        assert listed["smol"].status == "ready" and listed["qwen"].status == "unloaded"
        assert loads.count == {"smol": 1}  # the default model loads at start, the other on first use

        # /api/show of a model not loaded reads its header and vocabulary: nothing is loaded for it, and it
        # says what the loaded model says.
        o = ollama.Client(host=url, timeout=120)
        unloaded = o.show("qwen")
        assert loads.count == {"smol": 1}
        assert set(unloaded.capabilities) == {"completion", "tools", "insert"}
        assert unloaded.modelinfo["general.architecture"] == "qwen2" and "<|im_start|>" in unloaded.template
        assert "num_ctx                        1024" in unloaded.parameters  # its -c 2048 over 2 sequences

        # The first request for qwen waits for its load, and says how long; the next finds it loaded.
        raw = client.chat.completions.with_raw_response.create(model="qwen", messages=HI, max_tokens=1)
        assert float(raw.headers["x-model-load-seconds"]) > 0 and raw.parse().model == "qwen"
        raw = client.chat.completions.with_raw_response.create(model="qwen", messages=HI, max_tokens=1)
        assert "x-model-load-seconds" not in raw.headers

        # Each reply's prompt is the named model's own template and tokenizer, and the model reported.
        for name, own in (("qwen", qwen_engine), ("coder", qwen_engine), ("smol", engine)):
            reply = client.chat.completions.create(model=name, messages=HI, max_tokens=4, temperature=0)
            assert reply.model == ("smol" if name == "smol" else "qwen")
            assert reply.usage.prompt_tokens == len(own.chat_tokens(HI))
        assert len(engine.chat_tokens(HI)) != len(qwen_engine.chat_tokens(HI))
        assert loads.count == {"smol": 1, "qwen": 1}  # both fit: nothing was unloaded
        assert _loaded(url) == ["qwen", "smol"]

        # The Ollama API reaches the same models: show reads the named model's own header.
        loaded = o.show("qwen")
        assert (loaded.capabilities, loaded.template, loaded.parameters) == (
            unloaded.capabilities, unloaded.template, unloaded.parameters)
        assert o.show("smol:latest").modelinfo["general.architecture"] == "llama"
        assert {m.model for m in o.list().models} == {"smol", "qwen"}

        # Unknown names: 404 model_not_found in each protocol's shape, saying where the list is.
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
        assert err.value.code == "model_not_found" and "/v1/models" in err.value.message
        with pytest.raises(ollama.ResponseError) as oerr:
            o.chat(model="gpt-4o", messages=HI)
        assert oerr.value.status_code == 404 and "gpt-4o" in oerr.value.error

        # Metrics are labelled per model: only qwen's counter moves for a qwen request.
        before = (metric(url, "ggufchat_generated_tokens_total", 'model="qwen"'),
                  metric(url, "ggufchat_generated_tokens_total", 'model="smol"'))
        client.completions.create(model="qwen", prompt="def add(a, b):", max_tokens=5, temperature=0)
        assert metric(url, "ggufchat_generated_tokens_total", 'model="qwen"') == before[0] + 5
        assert metric(url, "ggufchat_generated_tokens_total", 'model="smol"') == before[1]
        assert metric(url, "ggufchat_model_loaded", 'model="qwen"') == 1


def test_a_budget_of_one_model_evicts_the_least_recently_used(model_path, qwen_path):
    loads = Loads()
    entries = [loads.entry("smol", model_path), loads.entry("qwen", qwen_path)]
    with several(entries, max_loaded=1) as url:
        client = _client(url)
        for name in ("qwen", "smol", "qwen"):
            reply = client.chat.completions.create(model=name, messages=HI, max_tokens=3, temperature=0)
            assert reply.model == name and _loaded(url) == [name]
        assert loads.count == {"smol": 2, "qwen": 2}
        # smol (loaded at start) made room for qwen twice, qwen for smol once.
        assert metric(url, "ggufchat_model_unloads_total", 'model="smol",why="evicted"') == 2
        assert metric(url, "ggufchat_model_unloads_total", 'model="qwen",why="evicted"') == 1
        assert requests.get(url + "/health", timeout=10).json()["models"][0]["name"] == "qwen"

    # The same with a memory budget that holds either model but not both.
    both = [estimate_memory(LoadOptions(model_path=p, n_seq_max=2, n_ctx=2048)) for p in (model_path, qwen_path)]
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path)],
                 memory_budget=sum(both) - 1) as url:
        _client(url).chat.completions.create(model="qwen", messages=HI, max_tokens=2)
        assert _loaded(url) == ["qwen"]
        health = requests.get(url + "/health", timeout=10).json()
        assert health["models"][0]["memory_bytes"] == both[1]
        assert health["models"][0]["expires_at"] > "2300"  # no keep_alive, no --idle-unload: kept


def _stream(url: str, model: str, out: dict) -> None:
    pieces, finish = [], None
    for chunk in _client(url).completions.create(model=model, stream=True, **LONG):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
        out.setdefault("first", time.monotonic())
    out.update(text="".join(pieces), finish=finish, end=time.monotonic())


def _qwen_during_a_smol_stream(url: str) -> tuple[dict, object, float]:
    """A long stream on smol and, once it has begun, a request for qwen: the stream's record, qwen's reply
    and when it came."""
    out: dict = {}
    streaming = threading.Thread(target=_stream, args=(url, "smol", out))
    streaming.start()
    assert wait_for(lambda: "first" in out, 30)
    reply = _client(url).chat.completions.create(model="qwen", messages=HI, max_tokens=3)
    qwen_done = time.monotonic()
    streaming.join(120)
    return out, reply, qwen_done


def test_a_long_stream_is_not_disturbed_by_loading_another_model(model_path, qwen_path):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path)]) as url:
        alone = _client(url).completions.create(model="smol", **LONG).choices[0].text
        out, reply, qwen_done = _qwen_during_a_smol_stream(url)
        assert loads.count == {"smol": 1, "qwen": 1}
        assert qwen_done < out["end"], "qwen loaded and answered while smol streamed"
        assert reply.model == "qwen"
        # The stream went on to its end, token for token what it is alone (greedy, one sequence).
        assert out["finish"] == "length" and out["text"] == alone


def test_a_model_answering_requests_is_never_evicted(model_path, qwen_path):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path)], max_loaded=1) as url:
        out, reply, qwen_done = _qwen_during_a_smol_stream(url)
        # qwen waited for the stream to end, then took smol's place.
        assert out["finish"] == "length" and len(out["text"]) > 100
        assert out["end"] < qwen_done and reply.model == "qwen"
        assert _loaded(url) == ["qwen"] and loads.count == {"smol": 1, "qwen": 1}


def test_keep_alive_follows_ollama(model_path, qwen_path):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path)]) as url:
        o = ollama.Client(host=url, timeout=120)
        # An empty request loads; keep_alive 0 (what `ollama stop` sends) unloads.
        assert o.generate(model="qwen", prompt="", keep_alive=-1).done_reason == "load"
        assert _loaded(url) == ["qwen", "smol"]
        ps = {m.model: m for m in o.ps().models}
        assert ps["qwen"].expires_at.year > 2100  # -1: kept for ever
        assert o.generate(model="qwen", prompt="", keep_alive=0).done_reason == "unload"
        assert wait_for(lambda: _loaded(url) == ["smol"], 10)
        # A request's keep_alive starts when it ends; the model unloads once it runs out.
        o.chat(model="qwen", messages=HI, keep_alive="1s", options={"num_predict": 2})
        assert _loaded(url) == ["qwen", "smol"]
        assert wait_for(lambda: _loaded(url) == ["smol"], 10)
        assert metric(url, "ggufchat_model_unloads_total", 'model="qwen",why="idle"') == 2
        assert loads.count == {"smol": 1, "qwen": 2}


def test_idle_unload_is_the_default_keep_alive(model_path, qwen_path):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path, keep_alive=-1)],
                 idle_unload=0.5) as url:
        client = _client(url)
        for name in ("smol", "qwen"):
            client.chat.completions.create(model=name, messages=HI, max_tokens=2)
        # smol follows --idle-unload; qwen's own keep_alive (-1, from its config) keeps it.
        assert wait_for(lambda: _loaded(url) == ["qwen"], 10)
        time.sleep(1)
        assert _loaded(url) == ["qwen"]
        assert requests.get(url + "/health", timeout=10).json()["status"] == "idle"
        assert client.chat.completions.create(model="smol", messages=HI, max_tokens=2).model == "smol"
        assert loads.count == {"smol": 2, "qwen": 1}
