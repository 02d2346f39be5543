"""/api/embed and /api/embeddings through the official ollama client, on a real embedding model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ollama
import pytest

from ggufchat.engine import Engine
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.settings import Settings
from tests.server.conftest import running


@pytest.fixture(scope="module")
def embed_url(minilm_engine: Engine, tmp_path_factory) -> Iterator[str]:
    app = create_app(ServerConfig(model_id="all-minilm", n_parallel=2), engine=minilm_engine,
                     settings=Settings(home=tmp_path_factory.mktemp("home")))
    with running(app) as url:
        yield url


@pytest.fixture
def client(embed_url: str) -> ollama.Client:
    return ollama.Client(host=embed_url, timeout=120)


def test_embed_many_texts(client: ollama.Client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    r = client.embed(model="all-minilm", input=texts)
    v = np.array(r.embeddings)
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # paraphrases closer than unrelated sentences
    assert r.prompt_eval_count > 12 and r.total_duration > 0 and r.load_duration >= 0
    one = client.embed(model="all-minilm", input=texts[0])
    assert np.allclose(one.embeddings[0], v[0], atol=1e-5)


def test_dimensions_truncate_and_renormalise(client: ollama.Client):
    r = client.embed(model="all-minilm", input="hello world", dimensions=64)
    v = np.array(r.embeddings[0])
    assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-4


def test_long_input_is_cut_by_default_and_refused_without_truncate(client: ollama.Client):
    long = "word " * 2000  # far past MiniLM's 512 tokens
    r = client.embed(model="all-minilm", input=long)
    assert len(r.embeddings[0]) == 384 and r.prompt_eval_count == 512
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="all-minilm", input=long, truncate=False)
    assert err.value.status_code == 400 and "512" in err.value.error


def test_empty_input_loads_only_and_empty_strings_in_a_list_are_refused(client: ollama.Client):
    assert client.embed(model="all-minilm", input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="all-minilm", input=["a", ""])
    assert err.value.status_code == 400


def test_the_older_embeddings_route(client: ollama.Client):
    old = client.embeddings(model="all-minilm", prompt="The cat sits on the mat.")
    new = client.embed(model="all-minilm", input="The cat sits on the mat.")
    assert np.allclose(old.embedding, new.embeddings[0], atol=1e-5)


def test_show_says_embedding_and_chat_is_refused(client: ollama.Client):
    assert client.show("all-minilm").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400 and "embedding model" in err.value.error
