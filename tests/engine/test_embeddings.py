"""Embeddings from the engine: a real BERT embedding model (all-MiniLM-L6-v2) and the decoder SmolLM2."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from ggufchat.engine.embeddings import MAX_INPUTS
from ggufchat.errors import EngineStopped, InvalidParameter

PAIRS = [  # (a, paraphrase of a)
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("How do I bake bread at home?", "What is a good recipe for homemade bread?"),
    ("The stock market fell sharply today.", "Share prices dropped a lot today."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_paraphrases_are_closer_than_unrelated_sentences(minilm_engine: Engine):
    texts = [t for pair in PAIRS for t in pair]
    v = minilm_engine.embed(texts).vectors
    for i in range(len(PAIRS)):
        a, b = 2 * i, 2 * i + 1
        para = _cos(v[a], v[b])
        for j in range(len(texts)):
            if j // 2 != i:
                # Each sentence is closer to its paraphrase than to any sentence of another pair, by a margin.
                assert para > _cos(v[a], v[j]) + 0.3, (texts[a], texts[b], texts[j])
        assert para > 0.6


def test_shape_normalisation_tokens_and_pooling(minilm_engine: Engine):
    spec = minilm_engine.embedding_spec()
    assert (spec.n_embd, spec.pooling, spec.encoder, spec.max_tokens) == (384, "mean", True, 512)
    e = minilm_engine.embed(["hello world", "unaffable"])
    assert e.vectors.shape == (2, 384) and e.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e.vectors, axis=1), 1.0, atol=1e-5)
    # [CLS] hello world [SEP]; [CLS] un ##aff ##able [SEP] (BERT's WordPiece, lower-cased)
    assert e.token_counts == [4, 5] and e.prompt_tokens == 9
    assert minilm_engine.tokenize("hello world", add_special=True) == [101, 7592, 2088, 102]


def test_batched_equals_one_by_one_and_keeps_order(minilm_engine: Engine):
    texts = ["short", "a somewhat longer sentence about the weather in spring", "x " * 300,
             "Paris is the capital of France.", "short"]
    together = minilm_engine.embed(texts).vectors
    alone = np.stack([minilm_engine.embed([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-4)
    np.testing.assert_allclose(together[0], together[4], atol=1e-6)
    assert _cos(together[0], together[3]) < 0.9  # different texts really differ


def test_many_inputs_span_several_batches(minilm_engine: Engine):
    texts = [f"sentence number {i} is about topic {i % 7}" for i in range(150)]  # > 64 inputs per batch
    e = minilm_engine.embed(texts)
    assert e.vectors.shape == (150, 384)
    for i in (0, 63, 64, 149):
        np.testing.assert_allclose(e.vectors[i], minilm_engine.embed([texts[i]]).vectors[0], atol=2e-4)


def test_token_arrays_embed_like_their_text(minilm_engine: Engine):
    ids = minilm_engine.tokenize("the quick brown fox", add_special=True)
    e = minilm_engine.embed([ids, "the quick brown fox"])
    np.testing.assert_allclose(e.vectors[0], e.vectors[1], atol=1e-6)
    assert e.token_counts == [len(ids), len(ids)]


def test_text_is_never_parsed_for_special_tokens(minilm_engine: Engine):
    # "[SEP]" in a text is text: it must not end the input early as the real separator would.
    with_marker = minilm_engine.embed(["first part [SEP] second part"])
    assert with_marker.token_counts[0] > len(minilm_engine.tokenize("first part [SEP] second part",
                                                                      add_special=True, parse_special=True))


def test_dimensions_truncate_and_renormalise(minilm_engine: Engine):
    full = minilm_engine.embed(["matryoshka dolls"]).vectors[0]
    short = minilm_engine.embed(["matryoshka dolls"], dimensions=64).vectors[0]
    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    assert minilm_engine.embed(["x"], dimensions=384).vectors.shape == (1, 384)
    for bad in (0, -1, 385):
        with pytest.raises(InvalidParameter, match="dimensions") as info:
            minilm_engine.embed(["x"], dimensions=bad)
        assert info.value.param == "dimensions"


@pytest.mark.parametrize("inputs, message", [
    ([], "empty"),
    ([""], "empty string"),
    (["fine", ""], r"input\[1\] is an empty string"),
    ([[]], "no tokens"),
    ([[101, -1, 102]], "outside the vocabulary"),
    ([[101, 30522, 102]], "outside the vocabulary"),
    ([[101, 2 ** 40]], "outside the vocabulary"),
    (["word " * 600], "at most 512 tokens"),
    ([[1000] * 513], "513 tokens"),
    (["x"] * (MAX_INPUTS + 1), "at most 2048"),
])
def test_bad_inputs_are_refused_before_llama_cpp(minilm_engine: Engine, inputs, message):
    with pytest.raises(InvalidParameter, match=message) as info:
        minilm_engine.embed(inputs)
    assert info.value.param == "input"
    assert minilm_engine.embed(["still works"]).vectors.shape == (1, 384)


def test_longest_input_fits(minilm_engine: Engine):
    e = minilm_engine.embed([[101] + [1000] * 510 + [102]])
    assert e.token_counts == [512]


def test_decoder_model_mean_pooling(engine: Engine):
    """SmolLM2 (a causal decoder, no pooling type in its GGUF): mean pooled through llama_decode, normalised,
    the same alone and in a batch. (Its vectors carry no promise of semantic quality.)"""
    spec = engine.embedding_spec()
    assert (spec.n_embd, spec.pooling, spec.encoder) == (576, "mean", False)
    texts = ["hello there", "a longer sentence about something else entirely", "hello there"]
    e = engine.embed(texts)
    assert e.vectors.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(e.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e.vectors[0], e.vectors[2], atol=1e-5)
    alone = engine.embed([texts[1]]).vectors[0]
    np.testing.assert_allclose(e.vectors[1], alone, atol=2e-3)
    assert _cos(e.vectors[0], e.vectors[1]) < 0.999
    assert e.token_counts == [len(engine.tokenize(t, add_special=True)) for t in texts]
    with pytest.raises(InvalidParameter, match="outside the vocabulary"):
        engine.embed([[engine.n_vocab]])


def test_generation_goes_on_while_embedding(engine: Engine):
    """Embeddings run on the engine thread between generation steps: a reply in progress finishes the same
    as without them."""
    prompt = engine.tokenize("1, 2, 3, 4, 5,", add_special=True)

    def request() -> GenerationRequest:
        return GenerationRequest(prompt_tokens=prompt, max_tokens=48, sampling=SamplingParams(temperature=0))

    expected = engine.submit(request()).text()
    stream = engine.submit(request())
    events = iter(stream)
    first = next(events)  # the reply has started: the embeddings land in the middle of it
    results = []
    worker = threading.Thread(target=lambda: results.append(engine.embed(["x " * 40] * 4)))
    worker.start()
    text = first.text + "".join(getattr(e, "text", "") for e in events)
    worker.join(60)
    assert text == expected and stream.finish.reason == "length"
    assert results and results[0].vectors.shape == (4, 576)


def test_closed_engine_refuses(minilm_path):
    eng = Engine(LoadOptions(model_path=minilm_path, n_seq_max=1))
    assert eng.embed(["before"]).vectors.shape == (1, 384)
    eng.close()
    with pytest.raises(EngineStopped):
        eng.embed(["after"])


@pytest.fixture(scope="module")
def minilm_weights(tmp_path_factory):
    """The original safetensors weights the GGUF was converted from, as float32 arrays."""
    from tests.conftest import _offline_models

    offline = _offline_models()
    folder = offline.hf_folder("all-minilm-l6-v2", tmp_path_factory.mktemp("minilm") / "hf")
    return {k: v.astype(np.float32) for k, v in offline.read_safetensors(folder / "model.safetensors").items()}


def _bert_reference(w: dict, ids: list[int]) -> np.ndarray:
    """all-MiniLM-L6-v2 in plain numpy float32 (BERT: 6 layers, 12 heads of 32, GELU, mean pooling)."""
    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    erf = np.vectorize(math.erf, otypes=[np.float32])
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    for layer in range(6):
        p = f"encoder.layer.{layer}."
        q, k, v = (linear(x, p + f"attention.self.{t}").reshape(n, 12, 32).transpose(1, 0, 2)
                   for t in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(32)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(n, 384)
        x = norm(x + linear(attended, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        hidden = linear(x, p + "intermediate.dense")
        hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
        x = norm(x + linear(hidden, p + "output.dense"), p + "output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_matches_the_original_weights_in_numpy(minilm_engine: Engine, minilm_weights):
    """The converted GGUF run by llama.cpp gives the vectors of the original float32 model (the same token
    ids), so the conversion (tensor names, layouts, norms, pooling) is right, not merely plausible."""
    texts = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog!", "x " * 100]
    got = minilm_engine.embed(texts).vectors
    for text, vector in zip(texts, got, strict=True):
        reference = _bert_reference(minilm_weights, minilm_engine.tokenize(text, add_special=True))
        assert float(vector @ reference) > 0.9999, text
