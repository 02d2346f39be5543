"""/api/pull and /api/delete through the official `ollama` client: a real download with the real hub
client from the fake hub on 127.0.0.1 into a model cache of the test's own, its progress streamed as
Ollama streams it, then listed, pulled again, deleted."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import ollama
import pytest

from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.settings import Settings
from tests.hubserver import FakeHub
from tests.server.conftest import running

REPO = "org/tiny-GGUF"
FILE = "tiny-q4_1.gguf"
PAUSE = 40 << 20  # the hub holds the body here until the test has seen a progress line mid-download


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # The hub clients keep caches and read tokens from the environment: keep them in the test's folder.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    import modelscope_hub.config

    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)


@pytest.fixture
def gguf(model_path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture
def hub(gguf) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_file(REPO, FILE, gguf, hubs=("hf",))
        h.add_file(REPO, "tiny-q8_0.gguf", gguf[:1000], hubs=("hf",))
        yield h


@pytest.fixture
def client(engine, hub, tmp_path) -> Iterator[ollama.Client]:
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.url, ms_endpoint=hub.url)
    app = create_app(ServerConfig(model_id="smollm2-test", n_parallel=engine.n_seq_max), engine=engine,
                     settings=settings)
    with running(app) as url:
        yield ollama.Client(host=url, timeout=120)


def test_pull_streams_progress_then_lists_and_deletes(client: ollama.Client, hub: FakeHub, gguf: bytes):
    resume = hub.pause_after(REPO, FILE, PAUSE)
    safety = threading.Timer(60, resume.set)  # never hang the run if no line comes mid-download
    safety.start()
    parts = []
    try:
        # Ollama's name for a Hugging Face GGUF repo and quant.
        for part in client.pull("hf.co/org/tiny-GGUF:Q4_1", stream=True):
            parts.append(part)
            # Lines below the pause may come too when the machine is slow; the one that counts is held.
            if part.total and PAUSE <= (part.completed or 0) < part.total:
                resume.set()
    finally:
        safety.cancel()
        resume.set()
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    progress = [p for p in parts if p.total]
    mid = [p for p in progress if 0 < p.completed < p.total]
    assert [p for p in mid if p.completed >= PAUSE], [p.model_dump(exclude_none=True) for p in parts]
    assert {p.status for p in mid} == {f"pulling {FILE}"}
    assert abs(mid[0].total - len(gguf)) < 0.1 * 2**20  # from the reported size, to a tenth of a MiB
    assert [p.completed for p in progress] == sorted(p.completed for p in progress)
    last = progress[-1]
    assert last.completed == last.total == len(gguf)
    assert last.digest == "sha256:" + hashlib.sha256(gguf).hexdigest()
    assert any(p.status.startswith("downloading tiny-q4_1.gguf") for p in parts)

    name = "hf://org/tiny-GGUF:q4_1"
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"smollm2-test", name}
    assert listed[name].size == len(gguf) and listed[name].digest == hashlib.sha256(gguf).hexdigest()
    assert listed[name].details.quantization_level == "Q4_1"
    # Pulled again: already in the cache, nothing fetched.
    fetched = len(hub.requests)
    assert client.pull(name).status == "success"
    assert not [r for r in hub.requests[fetched:] if r[1].endswith(FILE)]

    assert client.delete(name).status == "success"
    assert [m.model for m in client.list().models] == ["smollm2-test"]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(name)
    assert err.value.status_code == 404


def test_pull_failures(client: ollama.Client):
    # Not on the hub: the stream has begun, so the error comes as a line, which the client raises.
    with pytest.raises(ollama.ResponseError, match="not found"):
        list(client.pull("hf.co/org/missing-GGUF", stream=True))
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("hf.co/org/missing-GGUF")
    assert err.value.status_code == 500 and "not found" in err.value.error
    # A quant the repo does not have.
    with pytest.raises(ollama.ResponseError, match="no file for quant"):
        client.pull("hf.co/org/tiny-GGUF:Q5_K_M")
    # Not a name ggufchat can download: refused before anything is streamed.
    with pytest.raises(ollama.ResponseError) as err:
        list(client.pull("llama3.2", stream=True))
    assert err.value.status_code == 400 and "unknown model" in err.value.error


def test_a_server_of_the_cache_serves_a_model_pulled_while_it_runs(hub: FakeHub, tmp_path, monkeypatch):
    """`ggufchat serve` without a model: the cache and the embedded model; a model pulled meanwhile is
    listed and answers by its name at once, and cannot be deleted while it is loaded."""
    from ggufchat.cli.options import EngineFlags
    from ggufchat.cli.serve_models import CatalogSources, build_catalog
    from ggufchat.engine.grammar import GrammarLimits
    from ggufchat.models.embedded import NAME as EMBEDDED
    from ggufchat.server import pool
    from tests.server.conftest import wait_for

    home = tmp_path / "home"
    monkeypatch.setenv("GGUFCHAT_HOME", str(home))  # where the catalog looks, as `ggufchat serve` reads it
    # No rescan of the cache by time in this test: the pull itself must make the new model known.
    monkeypatch.setattr(pool, "RESCAN_SECONDS", 3600)
    catalog = build_catalog(CatalogSources(EngineFlags({"n_ctx": 1024}), parallel=1, grammar=GrammarLimits()))
    app = create_app(ServerConfig(model_id=catalog.default, n_parallel=1), catalog=catalog,
                     settings=Settings(home=home, hf_endpoint=hub.url, ms_endpoint=hub.url))
    name = "hf://org/tiny-GGUF:q4_1"
    hi = [{"role": "user", "content": "Hi"}]
    with running(app) as url:
        client = ollama.Client(host=url, timeout=120)
        assert [m.model for m in client.list().models] == [EMBEDDED]
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=name, messages=hi)
        assert err.value.status_code == 404
        assert client.pull("hf.co/org/tiny-GGUF:Q4_1").status == "success"
        # At once, no listing in between.
        reply = client.chat(model=name, messages=hi, options={"num_predict": 2})
        assert {m.model for m in client.list().models} == {EMBEDDED, name}
        assert reply.model == name and reply.eval_count == 2
        with pytest.raises(ollama.ResponseError) as err:
            client.delete(name)
        assert err.value.status_code == 400 and "loaded" in err.value.error
        client.generate(model=name, prompt="", keep_alive=0)  # `ollama stop`
        assert wait_for(lambda: name not in {m.model for m in client.ps().models}, 10)
        assert client.delete(name).status == "success"
        assert [m.model for m in client.list().models] == [EMBEDDED]
