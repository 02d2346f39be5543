"""Speculative decoding with a draft model (-md): the drafts' pricing on its own, then real engines.

The real-engine tests use SmolLM2 as its own draft model (the one pair of models with one vocabulary
that is small enough for the tests; docs/benchmarks.md has the Qwen2.5 0.5B -> 1.5B numbers). A draft as
expensive as the target never pays, so the engine, rightly, would not draft at all: the tests of the
drafting mechanics replace only the pricing (DraftState.draft_len) with "always the longest draft".
"""

from __future__ import annotations

import pytest

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from ggufchat.engine.draft_model import CATCH_UP_CHUNK
from ggufchat.engine.speculative import (
    MAX_PROBE_EVERY,
    PROBE_EVERY,
    PROBE_LEN,
    DraftState,
    StepCosts,
    best_draft_len,
    expected_tokens,
)
from ggufchat.errors import InvalidParameter, ModelLoadError
from tests.conftest import N_SEQ, chat, run_cli
from tests.engine.test_batching import PROMPTS
from tests.engine.test_speculative import COPY_PROMPTS, run

# The pricing on its own.


def linear(one: float, per_extra: float):
    return lambda n: one * (1 + per_extra * (n - 1))


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_a_cheap_draft_with_high_acceptance_drafts_long():
    # A GPU-like case: verifying 16 more positions costs little, a draft pass a tenth of a step.
    assert best_draft_len(0.95, linear(0.040, 0.01), 0.004, base=1, k_max=16) >= 8


def test_a_draft_as_slow_as_the_target_never_pays():
    assert best_draft_len(0.99, linear(0.040, 0.0), 0.040, base=1, k_max=16) == 0


def test_low_acceptance_does_not_pay_even_for_a_cheap_draft():
    assert best_draft_len(0.1, linear(0.040, 0.05), 0.004, base=1, k_max=16) == 0


def test_expensive_verification_shortens_the_draft():
    cheap = best_draft_len(0.8, linear(0.040, 0.01), 0.005, base=1, k_max=16)
    dear = best_draft_len(0.8, linear(0.040, 0.25), 0.005, base=1, k_max=16)
    assert 0 < dear < cheap


def test_the_issue_numbers_two_cores():
    # Qwen2.5-Coder 1.5B on 2 cores: 43 ms a token; the 0.5B draft 25 ms a pass; 98% accepted. If each
    # verified position adds 3/8 of a step (a compute-bound CPU), no draft length pays.
    assert best_draft_len(0.98, linear(0.043, 3 / 8), 0.025, base=1, k_max=16) == 0
    # If it adds 3/16, a short draft does (about 1.18x at 4); at 1/50, a longer one.
    assert best_draft_len(0.98, linear(0.043, 3 / 16), 0.025, base=1, k_max=16) == 4
    assert best_draft_len(0.98, linear(0.043, 1 / 50), 0.025, base=1, k_max=16) > 4


def test_acceptance_estimate_follows_the_verdicts():
    s = DraftState()
    start = s.acceptance
    s.update(4, 4)
    assert s.acceptance > start
    high = s.acceptance
    s.update(4, 0)
    assert s.acceptance < high


def test_a_refused_sequence_probes_ever_more_rarely():
    s = DraftState()
    s.acceptance = 0.05
    cost, cheap_pass = linear(0.040, 0.01), 0.004
    lengths = [s.draft_len(cost, cheap_pass, 1, 16) for _ in range(PROBE_EVERY)]
    assert lengths[:-1] == [0] * (PROBE_EVERY - 1) and lengths[-1] == PROBE_LEN
    s.update(PROBE_LEN, 0)  # the probe failed: the next one comes twice as late
    assert s.probe_every == 2 * PROBE_EVERY
    assert [s.draft_len(cost, cheap_pass, 1, 16) for _ in range(2 * PROBE_EVERY)].count(PROBE_LEN) == 1
    for _ in range(20):
        s.idle = s.probe_every
        s.update(PROBE_LEN, 0)
    assert s.probe_every == MAX_PROBE_EVERY
    # A draft model as slow as the target is not even probed.
    s = DraftState()
    s.acceptance = 0.05
    assert all(s.draft_len(linear(0.04, 0.0), 0.04, 1, 16) == 0 for _ in range(3 * PROBE_EVERY))


def test_step_costs_guess_unmeasured_sizes_from_measured_ones():
    c = StepCosts()
    assert c(1) > 0
    c.record(1, 0.040)
    # Past the largest measured size: each position at most EXTRA_POSITION of the smallest step.
    assert c(9) == pytest.approx(0.040 * (1 + StepCosts.EXTRA_POSITION * 8))
    c.record(5, 0.050)
    assert c(3) == pytest.approx(0.045) and c(5) == 0.050  # between measured sizes: on the line
    assert c(9) == pytest.approx(0.060)  # past them: the measured slope, lower than the prior's here
    c.record(5, 0.060)
    assert 0.050 < c(5) < 0.060  # smoothed
    c.record(1, 10.0)  # a step preempted by another process
    assert c(1) <= 0.040 * 1.1
    steep = StepCosts()
    steep.record(1, 0.040)
    steep.record(2, 0.100)  # a slope above the prior's: the prior's bounds the guess
    assert steep(9) == pytest.approx(0.100 + 7 * StepCosts.EXTRA_POSITION * 0.040)


def test_busy_steps_do_not_price_a_lone_sequence():
    c = StepCosts()
    c.record(1, 0.030)
    c.record(8, 0.300, sequences=8)  # eight sequences, a KV stream each
    # one sequence's 8 positions: not measured yet, guessed from its own table only
    assert c.view(1)(8) == pytest.approx(0.030 * (1 + StepCosts.EXTRA_POSITION * 7))
    assert c.view(8)(8) == 0.300 and c.view(5)(8) == 0.300  # 4 and more share one table


def test_a_table_not_yet_measured_is_priced_as_the_nearest_measured_one():
    c = StepCosts()
    assert c.view(2)(40) == c.view(2)(3)  # nothing measured anywhere: every size alike
    c.record(1, 0.030)
    c.record(9, 0.110)
    # A busy server's last two sequences, before any two-sequence step was measured: priced as one
    # sequence's steps, not as free.
    assert c.view(2)(40) == c.view(1)(40) > c.view(1)(10) > 0.110
    c.record(2, 0.050, sequences=2)
    # Once its own step is measured, it keeps that and takes the slope (0.01 per position) from table 1.
    assert c.view(2)(2) == 0.050 and c.view(2)(12) == pytest.approx(0.150)


# Options.

def test_draft_options_are_checked(model_path):
    with pytest.raises(InvalidParameter, match="needs a draft model"):
        LoadOptions(model_path=model_path, spec="draft").validate()
    with pytest.raises(InvalidParameter, match="is for --spec draft"):
        LoadOptions(model_path=model_path, spec="ngram", model_draft=model_path).validate()
    with pytest.raises(InvalidParameter, match="--draft-max"):
        LoadOptions(model_path=model_path, model_draft=model_path, draft_max=0).validate()
    with pytest.raises(InvalidParameter, match="--draft-min"):
        LoadOptions(model_path=model_path, model_draft=model_path, draft_min=20).validate()
    o = LoadOptions(model_path=model_path, model_draft=model_path)
    o.validate()
    assert o.spec == "draft"  # -md alone implies it, as in llama.cpp
    # The command line's default (auto): n-gram drafts, or the draft model when one is given.
    auto = LoadOptions(model_path=model_path, spec="auto")
    auto.validate()
    assert auto.spec == "ngram"
    auto = LoadOptions(model_path=model_path, spec="auto", model_draft=model_path)
    auto.validate()
    assert auto.spec == "draft"


def test_a_draft_model_with_another_vocabulary_is_refused(qwen_path, model_path):
    with pytest.raises(ModelLoadError, match="vocabulary|tokenizer|token"):
        Engine(LoadOptions(model_path=qwen_path, model_draft=model_path, n_ctx=1024))


def test_cli_refuses_a_mismatched_draft_model_in_one_line(qwen_path, model_path):
    r = run_cli("chat", str(qwen_path), "-md", str(model_path), "-c", "1024", input="hi\n")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "draft model" in errors[0], r.stderr[-2000:]


# Real engines.

def assert_same_up_to_ties(eng: Engine, prompt: list[int], spec: list[int]) -> None:
    """`spec` is the plain greedy output, except where the model's two best tokens are a numerical tie:
    a verify batch rounds the last bits unlike one-token decoding, as batching sequences together does
    (with this prompt, three plain copies decoded together diverge at the same place)."""
    eng.clear_cache()
    stream = eng.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=len(spec), logprobs=2,
                                          speculative=False))
    rows = [lp for e in stream if getattr(e, "logprobs", None) for lp in e.logprobs]
    plain = [lp.token for lp in rows]
    diverge = next((i for i, (a, b) in enumerate(zip(spec, plain, strict=True)) if a != b), None)
    if diverge is not None:
        top = rows[diverge].top
        assert top[0][1] - top[1][1] < 0.1, (diverge, top)


@pytest.fixture(scope="module")
def draft_engine(model_path):
    with Engine(LoadOptions(model_path=model_path, n_seq_max=N_SEQ, n_ctx=2048 * N_SEQ, seed=0,
                            model_draft=model_path, draft_max=8)) as eng:
        yield eng


@pytest.fixture
def always_draft(draft_engine, monkeypatch):
    """The drafting mechanics with the pricing replaced: every greedy sequence drafts its longest draft."""
    monkeypatch.setattr(DraftState, "draft_len", lambda self, costs, pass_s, base, k_max: k_max)
    draft_engine.clear_cache()
    return draft_engine


def test_an_unprofitable_draft_model_is_not_used(draft_engine):
    # SmolLM2 drafting for itself: a pass costs as much as a step, so no draft is ever priced in.
    draft_engine.clear_cache()
    prompt = chat(draft_engine, COPY_PROMPTS[0])
    plain, _ = run(draft_engine, prompt, speculative=False, n=80)
    spec, finish = run(draft_engine, prompt, speculative=True, n=80)
    assert spec == plain
    # The first drafts are priced before a pass was measured; after that, the price says no (a few
    # more where another process's load skews one measurement: always drafting would draft ~70).
    assert finish.usage.drafted_tokens <= 20


def test_drafts_keep_greedy_output(always_draft):
    eng = always_draft
    # The draft model stops a draft at the end of a reply, as the target would.
    assert eng.scheduler.draft_model.ends == eng.scheduler.eog != frozenset()
    drafted = accepted = 0
    for text in COPY_PROMPTS[:2] + PROMPTS[:3]:
        prompt = chat(eng, text)
        plain, f0 = run(eng, prompt, speculative=False, n=64)
        spec, f1 = run(eng, prompt, speculative=True, n=64)
        assert spec == plain, text
        assert (f1.reason, f1.usage.completion_tokens) == (f0.reason, f0.usage.completion_tokens)
        drafted += f1.usage.drafted_tokens
        accepted += f1.usage.accepted_tokens
    # A model drafting for itself agrees with itself.
    assert drafted > 100 and accepted >= 0.9 * drafted
    assert eng.scheduler.draft_model.passes > 0


def test_concurrent_drafting_sequences_equal_sequential(always_draft):
    eng = always_draft
    prompts = [chat(eng, p) for p in (COPY_PROMPTS + PROMPTS)[:3]]
    alone = [run(eng, p, speculative=False, n=40)[0] for p in prompts]
    eng.clear_cache()
    streams = [eng.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=40)) for p in prompts]
    assert [s.tokens() for s in streams] == alone
    assert all(s.finish.usage.drafted_tokens > 0 for s in streams)


def test_stop_strings_and_max_tokens_inside_drafts(always_draft):
    eng = always_draft
    prompt = chat(eng, COPY_PROMPTS[1])
    plain, _ = run(eng, prompt, speculative=False, n=60)
    text = eng.detokenize(plain)
    stop = text[len(text) // 2: len(text) // 2 + 6]
    for spec in (False, True):
        eng.clear_cache()
        stream = eng.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=60, stop=[stop],
                                              speculative=spec))
        out = stream.text()
        assert stop not in out and text.startswith(out) and stream.finish.reason == "stop"
    for n in (1, 7, 13):
        spec, finish = run(eng, prompt, speculative=True, n=n)
        assert spec == plain[:n] and finish.reason == "length"


def test_a_long_prompt_is_caught_up_over_several_steps(always_draft):
    eng = always_draft
    text = "Repeat this text exactly: " + " ".join(f"word{i}" for i in range(CATCH_UP_CHUNK))
    prompt = chat(eng, text)
    assert len(prompt) > 2 * CATCH_UP_CHUNK
    passes = eng.scheduler.draft_model.passes
    spec, finish = run(eng, prompt, speculative=True, n=40)
    assert finish.usage.drafted_tokens > 0
    assert_same_up_to_ties(eng, prompt, spec)
    # The catch-up took at least len(prompt) / CATCH_UP_CHUNK passes of its own.
    assert eng.scheduler.draft_model.passes - passes >= len(prompt) // CATCH_UP_CHUNK


def test_the_next_turn_reuses_both_caches(always_draft):
    eng = always_draft
    messages = [{"role": "user", "content": COPY_PROMPTS[0]}]
    first, _ = run(eng, eng.chat_tokens(messages), speculative=True, n=50)
    messages += [{"role": "assistant", "content": eng.detokenize(first)}, {"role": "user", "content": "Again."}]
    prompt = eng.chat_tokens(messages)
    stream = eng.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=30))
    spec = stream.tokens()
    assert stream.finish.usage.cached_tokens > len(prompt) // 2
    eng.clear_cache()
    plain, _ = run(eng, prompt, speculative=False, n=30)
    assert spec == plain
