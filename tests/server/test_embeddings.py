"""POST /v1/embeddings over real HTTP, with the official openai client and raw requests."""

from __future__ import annotations

import base64
import json
import time

import httpx2
import numpy as np
import openai
import pytest
import requests
from openai import OpenAI

from ggufchat.engine import Engine
from tests.server.conftest import metric, post, serve, wait_for


@pytest.fixture(scope="module")
def minilm_url(minilm_engine: Engine):
    with serve(minilm_engine, model_id="all-minilm-l6-v2", n_parallel=2) as url:
        yield url


@pytest.fixture
def client(minilm_url: str) -> OpenAI:
    return OpenAI(api_key="EMPTY", base_url=minilm_url + "/v1", max_retries=0)


def _matrix(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_openai_client_default_base64_and_float_agree(minilm_url: str, minilm_engine: Engine):
    sent: list[dict] = []
    http = httpx2.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    client = OpenAI(api_key="EMPTY", base_url=minilm_url + "/v1", max_retries=0, http_client=http)
    texts = ["The weather is lovely today.", "It is so sunny outside!", "He drove to the stadium."]
    default = client.embeddings.create(model="anything", input=texts)
    floats = client.embeddings.create(model="anything", input=texts, encoding_format="float")
    # With numpy installed the client asks for base64 by default, and decodes it itself.
    assert [body.get("encoding_format") for body in sent] == ["base64", "float"]
    a, b = _matrix(default), _matrix(floats)
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, minilm_engine.embed(texts).vectors, atol=1e-6)
    assert a[0] @ a[1] > a[0] @ a[2] + 0.2  # the paraphrase is closer than the unrelated sentence
    assert default.model == "all-minilm-l6-v2" and default.object == "list"
    expected = sum(len(minilm_engine.tokenize(t, add_special=True)) for t in texts)
    assert default.usage.prompt_tokens == expected == default.usage.total_tokens


def test_base64_is_little_endian_float32(minilm_url: str):
    floats = post(minilm_url, "/v1/embeddings", {"input": "abc", "encoding_format": "float"}).json()
    packed = post(minilm_url, "/v1/embeddings", {"input": "abc", "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"),
                                  np.array(floats["data"][0]["embedding"], dtype=np.float32))
    assert floats["data"][0] | {"embedding": None} == {"object": "embedding", "index": 0, "embedding": None}


def test_input_shapes(minilm_url: str, minilm_engine: Engine):
    ids = minilm_engine.tokenize("hello world", add_special=True)
    one_text = post(minilm_url, "/v1/embeddings", {"input": "hello world"}).json()
    one_array = post(minilm_url, "/v1/embeddings", {"input": ids}).json()
    arrays = post(minilm_url, "/v1/embeddings", {"input": [ids, ids[:2]]}).json()
    assert len(one_text["data"]) == len(one_array["data"]) == 1 and len(arrays["data"]) == 2
    np.testing.assert_allclose(one_text["data"][0]["embedding"], one_array["data"][0]["embedding"], atol=1e-6)
    np.testing.assert_allclose(one_text["data"][0]["embedding"], arrays["data"][0]["embedding"], atol=1e-6)
    assert [d["index"] for d in arrays["data"]] == [0, 1]
    assert arrays["usage"]["prompt_tokens"] == len(ids) + 2


def test_dimensions(client: OpenAI):
    r = client.embeddings.create(model="m", input=["a", "b"], dimensions=32)
    v = _matrix(r)
    assert v.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("body, param, fragment", [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": "word " * 600}, "input", "at most 512 tokens"),
    ({"input": [[101] * 600]}, "input", "600 tokens"),
    ({"input": [101, -5, 102]}, "input", "outside the vocabulary"),
    ({"input": [[101, 10 ** 9]]}, "input", "outside the vocabulary"),
    ({"input": "x", "dimensions": 0}, "dimensions", "between 1 and 384"),
    ({"input": "x", "dimensions": 4096}, "dimensions", "between 1 and 384"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": {"text": "x"}}, None, ""),
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
])
def test_bad_requests_are_400_in_openai_shape(minilm_url: str, body, param, fragment):
    r = post(minilm_url, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    assert requests.get(minilm_url + "/health", timeout=10).json()["status"] == "ok"


def test_openai_client_sees_a_bad_request(client: OpenAI):
    with pytest.raises(openai.BadRequestError, match="at most 512 tokens"):
        client.embeddings.create(model="m", input=["fine", "word " * 1000])


def test_one_long_token_array_is_judged_by_its_length(base_url: str, engine: Engine):
    # A token array longer than 2048 ids is one input, not 2048+ inputs: the error names its length.
    limit = engine.embedding_spec().max_tokens
    r = post(base_url, "/v1/embeddings", {"input": [1] * (limit + 52)})
    assert r.status_code == 400 and f"{limit + 52} tokens" in r.json()["error"]["message"]


def test_decoder_model_on_the_shared_server(base_url: str, engine: Engine):
    r = post(base_url, "/v1/embeddings", {"input": ["hello", "world"]}).json()
    v = np.array([d["embedding"] for d in r["data"]], dtype=np.float32)
    assert v.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert r["usage"]["prompt_tokens"] == sum(len(engine.tokenize(t, add_special=True)) for t in ("hello", "world"))


def test_timeout_stops_a_long_request(minilm_engine: Engine):
    # ~100k tokens: minutes of work; --timeout stops it between two batches.
    body = {"input": [f"sentence {i} " + "word " * 45 for i in range(2000)]}
    with serve(minilm_engine, model_id="m", timeout=1.0) as url:
        t0 = time.monotonic()
        r = post(url, "/v1/embeddings", body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - t0 < 15
        assert metric(url, "ggufchat_sequences_cancelled_total", 'why="timeout"') == 1
        assert post(url, "/v1/embeddings", {"input": "still serving"}).status_code == 200


def test_a_client_that_leaves_cancels_its_request(minilm_engine: Engine):
    body = {"input": [f"sentence {i} " + "word " * 45 for i in range(2000)]}
    with serve(minilm_engine, model_id="m") as url:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(url + "/v1/embeddings", json=body, timeout=1.5)
        assert wait_for(lambda: metric(url, "ggufchat_sequences_cancelled_total", 'why="disconnect"') == 1, 15)
        # The engine is free again: a batch of the abandoned request would otherwise run ahead of each of these.
        t0 = time.monotonic()
        for _ in range(5):
            assert post(url, "/v1/embeddings", {"input": "x " * 400}).status_code == 200
        assert time.monotonic() - t0 < 10


def test_api_key_is_required(minilm_engine: Engine):
    with serve(minilm_engine, model_id="m", api_keys=["secret"]) as url:
        assert post(url, "/v1/embeddings", {"input": "x"}).status_code == 401
        ok = post(url, "/v1/embeddings", {"input": "x"}, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200


def test_an_embedding_model_refuses_to_chat(client: OpenAI):
    # A BERT-style encoder has no next-token head: a chat request is a clear 400, not meaningless text.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="all-minilm-l6-v2", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5)
    assert "embedding model" in str(err.value)
