"""Logprobs of generated and prompt tokens, and max_tokens=0, on the real model.

The echo tests are the point: the logprob the engine reports for a token it generated must be the
logprob the same model gives that token when it is fed back as prompt (how lm-evaluation-harness scores
text), and both must agree with llama-cpp-python's own full-logits evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggufchat.engine import Delta, Engine, Finish, GenerationRequest, LoadOptions, SamplingParams
from ggufchat.engine.logprobs import full_logprobs, next_token_logprobs, token_logprob
from ggufchat.engine.templates import ChatTemplate
from ggufchat.errors import ContextOverflow, InvalidParameter
from tests.conftest import chat

# Feeding tokens as a prompt instead of one by one changes the batch shapes, so float sums differ in
# their last bits; measured differences are ~1e-5 and below.
TOL = 1e-3


def run(engine: Engine, request: GenerationRequest) -> tuple[list, Finish]:
    events = list(engine.submit(request))
    assert isinstance(events[-1], Finish)
    return events[:-1], events[-1]


def generated(deltas: list) -> tuple[list[int], list]:
    for d in deltas:
        if d.logprobs is not None:
            assert len(d.logprobs) == len(d.token_ids)
            assert [lp.token for lp in d.logprobs] == d.token_ids
    return ([t for d in deltas for t in d.token_ids],
            [lp for d in deltas for lp in d.logprobs or []])


def prompt_logprobs(engine: Engine, tokens: list[int], n_top: int = 3, **kw) -> list:
    deltas, finish = run(engine, GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=0,
                                                   prompt_logprobs=n_top, **kw))
    assert finish.reason == "length" and finish.usage.completion_tokens == 0
    assert len(deltas) == 1 and deltas[0].text == "" and deltas[0].token_ids == []
    lps = deltas[0].prompt_logprobs
    assert len(lps) == len(tokens) and lps[0] is None
    assert [lp.token for lp in lps[1:]] == tokens[1:]
    return lps


def max_diff(a: list, b: list) -> float:
    assert [x.token for x in a] == [y.token for y in b]
    return max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True))


# The arithmetic, without the model.

def test_log_softmax_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((5, 3000)) * 8).astype(np.float32)
    rows[1, 10:14] = rows[1].max()  # ties at the top: lower ids first, as argmax
    got = next_token_logprobs(rows, [0, 1, 2, 3, 4], 4)
    for j, row in enumerate(rows):
        exact = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum())
        assert math.isclose(got[j].logprob, exact[j], abs_tol=1e-6)
        assert np.exp(full_logprobs(row)).sum() == pytest.approx(1.0, abs=1e-6)
        order = sorted(range(row.size), key=lambda i: (-row[i], i))[:4]
        assert [i for i, _ in got[j].top] == order
        assert np.allclose([v for _, v in got[j].top], exact[order], atol=1e-6)
        assert got[j] == token_logprob(row, j, 4)
    assert [i for i, _ in got[1].top] == [10, 11, 12, 13]
    assert token_logprob(rows[0], 7, 0).top == []


# Generated tokens.

def test_greedy_picks_the_top_logprob_at_every_step(fresh: Engine):
    deltas, finish = run(fresh, GenerationRequest(chat(fresh, "Tell me about the moon."), SamplingParams.greedy(),
                                                  max_tokens=30, logprobs=5))
    tokens, lps = generated(deltas)
    assert len(tokens) == len(lps) == finish.usage.completion_tokens > 10
    for lp in lps:
        assert lp.top[0] == (lp.token, lp.logprob)
        assert len(lp.top) == 5 and all(v <= 0 for _, v in lp.top)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(math.exp(v) for _, v in lp.top) <= 1 + 1e-6


def test_no_logprobs_unless_asked(fresh: Engine):
    deltas, _ = run(fresh, GenerationRequest(chat(fresh, "Hi"), SamplingParams.greedy(), max_tokens=5))
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in deltas)


def test_echo_gives_the_logprobs_of_generation(model_path):
    """Generate with logprobs, then feed prompt + output back with prompt_logprobs: the same numbers.
    Sampled with temperature and penalties and with end-of-generation banned: logprobs are the model's
    raw distribution, which none of them touch.

    Both in an engine that decodes one token a step: llama.cpp's kernels for one token and for a batch
    differ in their rounding, and on this model that moves a logprob by up to ~0.4 (llama-cpp-python
    shows the same evaluating token by token vs all at once), so a prompt decoded in one batch cannot
    reproduce generation's numbers exactly."""
    with Engine(one_token_a_step(model_path)) as engine:
        prompt = chat(engine, "Write two sentences about rivers.")
        cases = [
            dict(sampling=SamplingParams.greedy(), ignore_eos=True),
            dict(sampling=SamplingParams(temperature=1.2, top_k=0, top_p=1, min_p=0, repeat_penalty=1.3, seed=7)),
        ]
        for case in cases:
            deltas, _ = run(engine, GenerationRequest(prompt, max_tokens=16, logprobs=3, **case))
            tokens, lps = generated(deltas)
            echo = prompt_logprobs(engine, prompt + tokens)[len(prompt):]
            assert max_diff(echo, lps) < TOL
            for a, b in zip(echo, lps, strict=True):
                assert np.allclose([v for _, v in a.top], [v for _, v in b.top], atol=TOL)


def one_token_a_step(model_path) -> LoadOptions:
    return LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=512, n_batch=1, n_ubatch=1, flash_attn="off")


def plain(model_path, n_batch: int = 512) -> LoadOptions:
    """Flash attention off: on CPU its rounding depends on the batch's shape (up to ~0.3 here)."""
    return LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch,
                       flash_attn="off")


def long_prompt(engine: Engine) -> list[int]:
    tokens = chat(engine, " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(34)))
    assert len(tokens) > 300  # two chunks of at most 256 in a big batch, six in a batch of 64
    return tokens


@pytest.fixture(scope="module")
def plain_engine(model_path):
    with Engine(plain(model_path)) as engine:
        yield engine


def test_prompt_logprobs_agree_with_llama_cpp_python(plain_engine: Engine, model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokens = long_prompt(plain_engine)
    ours = prompt_logprobs(plain_engine, tokens, n_top=0)
    llm = llama_cpp.Llama(str(model_path), logits_all=True, n_ctx=1024, flash_attn=False, verbose=False)
    try:
        llm.eval(tokens)
        scores = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    assert max_diff(ours[1:], next_token_logprobs(scores[:-1], tokens[1:], 0)) < TOL


def test_a_long_prompt_fed_in_chunks_gives_the_same_logprobs(plain_engine: Engine, model_path):
    tokens = long_prompt(plain_engine)
    with Engine(plain(model_path, n_batch=64)) as small:
        assert max_diff(prompt_logprobs(plain_engine, tokens)[1:], prompt_logprobs(small, tokens)[1:]) < TOL


def test_a_cached_prefix_is_decoded_again(fresh: Engine):
    tokens = chat(fresh, "What is the tallest mountain?")
    first = prompt_logprobs(fresh, tokens)
    run(fresh, GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=4))  # now cached
    deltas, finish = run(fresh, GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=4, prompt_logprobs=3))
    assert finish.usage.cached_tokens == 0
    assert deltas[0].prompt_logprobs is not None and deltas[0].token_ids == []
    assert all(d.prompt_logprobs is None for d in deltas[1:]) and len(deltas) > 1
    assert max_diff(deltas[0].prompt_logprobs[1:], first[1:]) < TOL
    assert [lp.top for lp in prompt_logprobs(fresh, tokens)[1:]] == [lp.top for lp in first[1:]]


# max_tokens = 0, and everything at once.

def test_max_tokens_zero_decodes_the_prompt_only(fresh: Engine):
    tokens = chat(fresh, "Hello")
    deltas, finish = run(fresh, GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=0))
    assert deltas == []
    assert finish.reason == "length" and finish.usage.completion_tokens == 0
    assert finish.usage.prompt_tokens == len(tokens)


def test_max_tokens_zero_may_fill_the_whole_context(model_path):
    """No token will be generated, so the prompt may take every position of the sequence."""
    with Engine(LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=256, n_batch=128, n_ubatch=128)) as small:
        n = small.n_ctx_seq
        tokens = (chat(small, "Count: " + " ".join(str(i) for i in range(n))) * 2)[:n]
        assert len(prompt_logprobs(small, tokens, n_top=1)) == n
        with pytest.raises(ContextOverflow):
            small.prepare(GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=1))
        with pytest.raises(ContextOverflow):
            small.prepare(GenerationRequest(tokens + tokens[-1:], SamplingParams.greedy(), max_tokens=0))


def test_prompt_logprobs_with_concurrent_sequences(fresh: Engine):
    prompts = [chat(fresh, f"Question {i}: why is {w} a colour?") for i, w in
               enumerate(["red", "blue", "green", "teal", "pink", "gold", "grey", "cyan"])]
    solo_prompt = [prompt_logprobs(fresh, p) for p in prompts[:4]]
    solo_text = []
    for p in prompts[4:]:
        fresh.clear_cache()
        solo_text.append(fresh.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=12)).tokens())
    fresh.clear_cache()
    streams = [fresh.submit(GenerationRequest(p, SamplingParams.greedy(), prompt_logprobs=3, ignore_eos=True,
                                              max_tokens=[0, 6][i % 2])) for i, p in enumerate(prompts[:4])]
    streams += [fresh.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=12)) for p in prompts[4:]]
    events = [list(s) for s in streams]
    for i, evs in enumerate(events[:4]):
        assert evs[0].prompt_logprobs is not None  # before any generated token
        assert max_diff(evs[0].prompt_logprobs[1:], solo_prompt[i][1:]) < TOL
        assert evs[-1].usage.completion_tokens == [0, 6][i % 2]
    assert [[t for e in evs if isinstance(e, Delta) for t in e.token_ids] for evs in events[4:]] == solo_text


@pytest.mark.parametrize("bad", [{"logprobs": 21}, {"logprobs": -1}, {"prompt_logprobs": 21}, {"max_tokens": -1}])
def test_out_of_range_counts_are_refused(engine: Engine, bad: dict):
    with pytest.raises(InvalidParameter) as info:
        engine.prepare(GenerationRequest(chat(engine, "hi"), SamplingParams.greedy(), **bad))
    assert info.value.param == next(iter(bad))


# Facade additions.

def test_token_pieces(engine: Engine):
    ids = engine.tokenize("héllo<|im_end|>", add_special=False, parse_special=True)
    pieces = engine.token_pieces(ids)
    assert b"".join(pieces) == "héllo".encode()
    assert pieces[-1] == b"" and engine.token_pieces(ids, special=True)[-1] == b"<|im_end|>"
    with pytest.raises(InvalidParameter):
        engine.token_pieces([engine.n_vocab])


def test_tools_and_template_kwargs_reach_the_template(engine: Engine, monkeypatch):
    source = ("{{ 'tools=' ~ (tools | tojson if tools is defined else 'undefined') }}|{{ flag | default('-') }}|"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(engine, "template", ChatTemplate(source))
    msgs = [{"role": "user", "content": "hi"}]
    assert engine.render_chat(msgs) == "tools=undefined|-|hi"
    tools = [{"type": "function", "function": {"name": "f"}}]
    text = engine.render_chat(msgs, tools=tools, template_kwargs={"flag": True})
    assert text.startswith('tools=[{"type": "function", "function": {"name": "f"') and text.endswith("|True|hi")
    assert engine.detokenize(engine.chat_tokens(msgs, tools=tools)) == engine.render_chat(msgs, tools=tools)
    with pytest.raises(InvalidParameter) as info:
        engine.render_chat(msgs, template_kwargs={"messages": []})
    assert info.value.param == "chat_template_kwargs"
