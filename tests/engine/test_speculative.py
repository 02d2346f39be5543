"""Speculative decoding with n-gram drafts: greedy output is the same token for token with and without it."""

from __future__ import annotations

import pytest

from ggufchat.bench import edit_prompt
from ggufchat.cli.options import BY_NAME
from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from ggufchat.engine.scheduler import draft_room
from ggufchat.engine.speculative import MatchOdds, NgramDrafter, NgramPool
from ggufchat.errors import InvalidParameter
from tests.conftest import N_SEQ, chat
from tests.engine.test_batching import PROMPTS

CODE = "\n".join(f"def func_{i}(x):\n    return x * {i} + {i * 3}" for i in range(12))
COPY_PROMPTS = [
    f"Repeat this code exactly:\n{CODE}",
    "Repeat after me: the quick brown fox jumps over the lazy dog. " * 3,
    "List the numbers from 1 to 40, separated by commas.",
    f"Here is a list: {', '.join(f'item {i}' for i in range(30))}. Write it again.",
]


@pytest.fixture(scope="module")
def spec_engine(model_path):
    """The shared test engine's shape with --spec ngram (speculation is opt-in)."""
    with Engine(LoadOptions(model_path=model_path, n_seq_max=N_SEQ, n_ctx=2048 * N_SEQ, seed=0, spec="ngram")) as eng:
        yield eng


@pytest.fixture
def fresh(spec_engine: Engine) -> Engine:
    spec_engine.clear_cache()
    return spec_engine


@pytest.fixture(scope="module")
def qwen_spec(qwen_path):
    with Engine(LoadOptions(model_path=qwen_path, n_seq_max=2, n_ctx=4096 * 2, seed=0, spec="ngram")) as eng:
        yield eng


def run(engine: Engine, prompt: list[int], *, speculative: bool, n: int | None = 120, **kw):
    engine.clear_cache()
    stream = engine.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=n,
                                             speculative=speculative, **kw))
    tokens = stream.tokens()
    return tokens, stream.finish


# The drafter on its own.

def test_lookup_takes_what_followed_the_most_recent_earlier_occurrence():
    d = NgramDrafter([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3])
    assert d.lookup(3) == [7, 8, 5]  # the occurrence at 4..6 is more recent than the one at 0..2
    d.push(7)
    assert d.lookup(2) == [8, 5]


def test_lookup_falls_back_to_shorter_ngrams_and_finds_nothing_new():
    d = NgramDrafter([5, 6, 7, 8, 6, 7])  # "6 7" occurred before, followed by 8
    assert d.lookup(4) == [8, 6, 7, 8]  # the repeat continues into the draft
    assert NgramDrafter([1, 2, 3, 4]).lookup(4) == []
    assert NgramDrafter([]).lookup(4) == []


def test_a_draft_stops_before_the_end_of_a_turn():
    end = 99
    # A file copied from the user's turn: the draft follows the file, and stops where the turn ended.
    d = NgramDrafter([5, 1, 2, 3, 4, end, 7, 8, 1, 2], ends=frozenset({end}))
    assert d.draft(10) == [3, 4]
    d.push(3)
    d.push(4)
    assert d.draft(10) == []  # what follows is the end of the turn: nothing to draft
    # The pool's drafts stop there too.
    pool = learned([1, 2, 3, 4, 5, end, 6, 7])
    d = NgramDrafter([9, 9, 1, 2, 3], pool, ends=frozenset({end}))
    assert d.draft(10) == [4, 5]
    assert NgramDrafter([9, 9, 1, 2, 3], pool).draft(10) == [4, 5, end, 6, 7]


def test_the_engine_drafts_up_to_the_end_of_a_turn(fresh):
    eos = fresh.tokenizer.eog_tokens()
    prepared = fresh.prepare(GenerationRequest(chat(fresh, "Hi"), SamplingParams.greedy(), max_tokens=8))
    assert prepared.drafter.ends == frozenset(eos) and eos


def verify_ms(n: int) -> float:
    """A verify step's cost by its batch positions, as measured for Qwen2.5-Coder-0.5B on 2 CPU cores
    (docs/benchmarks.md): 16 positions cost ~6x one."""
    table = {1: 20.9, 2: 35.5, 4: 48.6, 8: 89.5, 16: 132.9, 32: 240.0}
    low = max(k for k in table if k <= n)
    high = min((k for k in table if k >= n), default=low)
    return table[low] if high == low else table[low] + (table[high] - table[low]) * (n - low) / (high - low)


def test_draft_length_follows_the_odds_of_the_match_length():
    d = NgramDrafter([1, 2, 1, 2, 1, 2, 1, 2] * 10)  # a 64-token-deep match
    assert len(d.draft(100)) == 100  # steps of any size cost the same: as long as allowed
    assert len(d.draft(3, verify_ms)) == 3  # the scheduler's cap wins
    fresh = len(d.draft(16, verify_ms))
    assert 0 < fresh < 16  # priced: the prior odds (7 in 8) do not pay for 16 positions
    d.update(fresh, fresh)
    for _ in range(10):  # long matches keep being right: drafts grow to the cap
        d.update(16, 16)
    assert len(d.draft(16, verify_ms)) == 16


def test_wrong_short_matches_stop_drafting_there_not_on_long_ones():
    odds = MatchOdds()
    assert odds.length(2, 16, verify_ms, 1) > 0  # a new sequence drafts
    for _ in range(4):
        odds.update(2, 4, 0)  # 2-token matches guessed wrong
    assert odds.chance(2) < 0.5 and odds.length(2, 16, verify_ms, 1) == 0
    assert odds.length(20, 16, verify_ms, 1) > 0
    odds.update(20, 16, 16)  # 16 right, counted in the buckets of 16-31 and 32+ tokens
    assert odds.chance(20) > 7 / 8 and odds.chance(40) > 7 / 8
    # Only positions up to the first wrong one are judged: 3 right, 1 wrong, 12 never judged.
    before = sum(odds.tried)
    odds.update(8, 16, 3)
    assert sum(odds.tried) == before + 4


def test_a_draft_not_made_is_judged_on_the_tokens_that_come():
    # A sequence in a full batch drafts nothing, but learns how its matches fare.
    d = NgramDrafter([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2])  # would draft 3 4 5 6 ...
    tried, right = sum(d.own.tried), sum(d.own.right)
    d.watch()
    for tok in (3, 4, 5):
        d.push(tok)
    d.push(0)  # the fourth guess was wrong
    assert sum(d.own.tried) - tried == 4 and sum(d.own.right) - right == 3
    # A sequence whose short matches kept guessing wrong while it could not draft (a full batch) does not
    # draft on them once it could; one that kept no record drafts on the prior's odds.
    d = NgramDrafter([7, 8, 1, 7, 8, 2, 7, 8, 3, 7, 8])
    for wrong in range(20, 30):
        d.watch()
        d.push(wrong)
        d.push(7)
        d.push(8)
    assert d.own.chance(2) < 0.5
    assert d.draft(8, verify_ms) == []
    assert NgramDrafter(d.history).draft(8, verify_ms) != []


def test_a_busy_step_prices_drafts_dearer():
    odds = MatchOdds()
    alone = odds.length(8, 16, verify_ms, 1)
    # Three other sequences in the step, and a batch already compute-bound: every extra position costs
    # as much as a whole one, and slows the others too.
    assert odds.length(8, 16, lambda n: 20.0 * n, 4) < alone


# The pool of earlier sequences' n-grams.

def learned(*sequences: list[int], n: int = 3, entries: int = 1000) -> NgramPool:
    pool = NgramPool(n, entries)
    for tokens in sequences:
        pool.learn(list(tokens))
    while pool.pending:
        pool.index()
    return pool


def test_pool_drafts_what_followed_in_an_earlier_sequence_token_by_token():
    pool = learned([1, 2, 3, 4, 5, 6, 7], [9, 9, 2, 3, 4, 8])
    assert pool.lookup([0, 2, 3, 4], 3) == [8]  # the latest sequence wins; then "3 4 8" is unknown
    assert pool.lookup([7, 1, 2, 3], 10) == [4, 8]  # the chain follows the draft's own last n tokens
    assert pool.lookup([4, 5, 6], 2) == [7]
    assert pool.lookup([5, 6, 7], 4) == [] and pool.lookup([2, 3], 4) == []
    pool.clear()
    assert pool.lookup([7, 1, 2, 3], 10) == []


def test_pool_learns_a_long_sequence_a_chunk_at_a_time():
    pool = NgramPool(2, 10_000)
    pool.learn(list(range(1000)))
    pool.index(100)
    assert pool.pending and pool.lookup([40, 41], 3) == [42, 43, 44] and pool.lookup([500, 501], 1) == []
    while pool.pending:
        pool.index(100)
    assert pool.lookup([500, 501], 1) == [502]


def test_pool_memory_is_bounded_and_keeps_what_is_refreshed():
    pool = NgramPool(2, 100)  # two generations of 50 entries
    hot = [7, 7, 7, 1]
    for start in range(0, 10_000, 10):
        pool.learn(list(range(100_000 + start, 100_000 + start + 10)))
        pool.learn(hot)
        pool.index(10_000)
        assert len(pool.young) + len(pool.old) <= 100
    assert pool.lookup([100_000, 100_001], 1) == []  # the oldest are gone
    assert pool.lookup([7, 7], 2) == [1]  # learned again and again: still there


def test_own_history_first_unless_its_match_is_shorter_than_the_pools_and_the_pool_fares_as_well():
    pool = learned([5, 6, 7, 8, 9, 1, 2, 3], n=4)
    # Own history holds "7 8 9" followed by 4: a 3-token match, shorter than the pool's 4.
    d = NgramDrafter([7, 8, 9, 4, 0, 6, 7, 8, 9], pool)
    assert d.draft(3) == [1, 2, 3] and d.from_pool
    # ...but not once the own drafts have fared better than the pool's.
    d = NgramDrafter([7, 8, 9, 4, 0, 6, 7, 8, 9], pool)
    d.own.update(3, 4, 4)
    assert d.draft(3) == [4, 0, 6] and not d.from_pool
    # Both hold "6 7 8 9" and more before it: own history wins.
    d = NgramDrafter([5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9], pool)
    assert d.draft(3) == [4, 5, 6] and not d.from_pool
    # No own match at all: the pool.
    d = NgramDrafter([0, 0, 6, 7, 8, 9], pool)
    assert d.draft(8) == [1, 2, 3] and d.from_pool


def test_pool_misses_count_against_the_pool_not_own_history():
    pool = learned([1, 2, 3, 4, 5, 6, 7, 8], n=4)
    d = NgramDrafter([9, 9, 9, 1, 2, 3, 4], pool)  # no own match: pool drafts
    assert d.draft(4, verify_ms) and d.from_pool
    for _ in range(3):
        d.update(4, 0)
    assert d.draft(4, verify_ms) == []  # the pool's guesses failed: no more pool drafts
    for tok in (9, 9):  # now own history matches "9 9": it drafts
        d.push(tok)
    assert d.draft(4) == [1, 2, 3, 4] and not d.from_pool
    assert d.pooled.chance(pool.n) < d.own.chance(2)


def test_no_drafts_once_the_batch_is_busy():
    assert draft_room(1, 2048) > 0
    assert draft_room(8, 2048) == 0
    assert draft_room(1, 1) == 0


def test_spec_flag_takes_llama_cpp_spellings():
    parse = BY_NAME["spec"].parse
    assert [parse(v) for v in ("none", "ngram", "ngram-simple", "NGRAM-MOD")] == ["none", "ngram", "ngram", "ngram"]
    assert "--spec-type" in BY_NAME["spec"].flags
    with pytest.raises(InvalidParameter, match="--spec"):
        LoadOptions(model_path="x", spec=parse("draft-simple")).validate()


# Exactness on the real model.

def test_speculation_drafts_and_keeps_greedy_output(fresh: Engine):
    drafted = accepted = 0
    for text in COPY_PROMPTS + PROMPTS[:4]:
        prompt = chat(fresh, text)
        plain, f0 = run(fresh, prompt, speculative=False, n=64)
        spec, f1 = run(fresh, prompt, speculative=True, n=64)
        assert spec == plain, text
        assert (f1.reason, f1.usage.completion_tokens) == (f0.reason, f0.usage.completion_tokens)
        assert f0.usage.drafted_tokens == 0
        assert f1.usage.accepted_tokens <= f1.usage.drafted_tokens
        drafted += f1.usage.drafted_tokens
        accepted += f1.usage.accepted_tokens
    assert accepted > 30 and drafted > accepted
    stats = fresh.stats()
    assert stats.accepted_tokens >= accepted and stats.drafted_tokens >= drafted


def test_a_request_like_a_finished_one_drafts_from_the_pool(model_path):
    # A reply that neither copies its prompt nor repeats itself: its own history has little to draft
    # from, but the same question asked again can draft the whole earlier reply from the pool. (An
    # engine of its own: the step costs other tests measured would price these drafts differently.)
    with Engine(LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=2048, seed=0, spec="ngram")) as eng:
        prompt = chat(eng, "Write a short poem about the sea.")
        scheduler = eng.scheduler
        # Priced as if every step size cost the same: this is about what the pool drafts, and SmolLM2's
        # ~5 ms steps are too noisy to price on (a measured spike refused every pool draft, ~1 run in 4).
        scheduler.step_costs.view = lambda sequences: (lambda n: 0.01)
        alone, first = run(eng, prompt, speculative=True, n=60)
        assert scheduler.pool_drafted_tokens == 0  # nothing learned yet
        again = eng.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=60))
        assert again.tokens() == alone
        assert scheduler.pool_accepted_tokens > 30
        assert again.finish.usage.accepted_tokens > first.usage.accepted_tokens + 20
        assert scheduler.pool_drafted_tokens < scheduler.pool_accepted_tokens + 8  # and it guessed well
        drafted = scheduler.pool_drafted_tokens
        run(eng, prompt, speculative=True, n=60)  # clear_cache forgets the pool too
        assert scheduler.pool_drafted_tokens == drafted


def test_eight_concurrent_speculating_sequences_equal_sequential(fresh: Engine):
    prompts = [chat(fresh, p) for p in (COPY_PROMPTS + PROMPTS)[:N_SEQ]]
    alone = [run(fresh, p, speculative=False, n=40)[0] for p in prompts]
    fresh.clear_cache()
    streams = [fresh.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=40)) for p in prompts]
    assert [s.tokens() for s in streams] == alone
    # Mixed: half of them opt out, and two join while the others are generating.
    fresh.clear_cache()
    streams = [fresh.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=40, speculative=i % 2 == 0))
               for i, p in enumerate(prompts[:6])]
    head = next(iter(streams[0])).token_ids  # the first six are generating
    streams += [fresh.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=40)) for p in prompts[6:]]
    assert [head + streams[0].tokens()] + [s.tokens() for s in streams[1:]] == alone
    assert all(s.finish.usage.drafted_tokens == 0 for s in streams[1:6:2])


def test_one_speculating_sequence_among_sampled_ones(fresh: Engine):
    prompt = chat(fresh, COPY_PROMPTS[0])
    plain, _ = run(fresh, prompt, speculative=False, n=100)
    fresh.clear_cache()
    sampled = [fresh.submit(GenerationRequest(chat(fresh, p), SamplingParams(temperature=0.9, seed=1),
                                              max_tokens=60)) for p in PROMPTS[:2]]
    greedy = fresh.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=100))
    assert greedy.tokens() == plain
    for s in sampled:
        s.tokens()
        assert s.finish.usage.drafted_tokens == 0  # sampled requests never speculate
    assert greedy.finish.usage.accepted_tokens > 0


def test_max_tokens_and_stop_strings_cut_inside_drafts(fresh: Engine):
    prompt = chat(fresh, COPY_PROMPTS[0])
    full, _ = run(fresh, prompt, speculative=False, n=100)
    text = fresh.detokenize(full)
    cut_inside = 0
    for n in range(3, 100, 9):
        spec, finish = run(fresh, prompt, speculative=True, n=n)
        assert spec == full[:n]
        assert finish.reason == "length" and finish.usage.completion_tokens == n
        cut_inside += finish.usage.drafted_tokens > 0
    assert cut_inside > 6
    for at in range(20, len(text) - 10, 61):
        stop = text[at:at + 6]
        if not stop.strip() or text.find(stop) != at:
            continue
        fresh.clear_cache()
        plain = fresh.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=100, stop=[stop],
                                               speculative=False))
        want = plain.text()
        fresh.clear_cache()
        spec = fresh.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=100, stop=[stop]))
        assert spec.text() == want == text[:at]
        assert spec.finish.reason == plain.finish.reason == "stop"
        assert spec.finish.usage.completion_tokens == plain.finish.usage.completion_tokens


def test_the_cache_after_a_rejected_draft_serves_the_next_turn(fresh: Engine):
    # A slot's tokens must equal its KV after drafts are cut back: the next turn reuses them.
    prompt = chat(fresh, COPY_PROMPTS[1])
    first, _ = run(fresh, prompt, speculative=True, n=60)
    follow = prompt + first + chat(fresh, "Again, please.")[1:]
    fresh.clear_cache()
    cold = fresh.submit(GenerationRequest(follow, SamplingParams.greedy(), max_tokens=60, speculative=False)).tokens()
    fresh.clear_cache()
    fresh.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=60)).tokens()
    warm = fresh.submit(GenerationRequest(follow, SamplingParams.greedy(), max_tokens=60))
    assert warm.tokens() == cold
    assert warm.finish.usage.cached_tokens > len(prompt)


def test_logprobs_with_speculation(fresh: Engine):
    prompt = chat(fresh, COPY_PROMPTS[0])

    def logprobs(speculative: bool):
        fresh.clear_cache()
        stream = fresh.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=80, logprobs=2,
                                                speculative=speculative))
        rows = [(lp.token, round(lp.logprob, 4), [t for t, _ in lp.top]) for e in stream
                if getattr(e, "logprobs", None) for lp in e.logprobs]
        return rows, stream.finish

    plain, _ = logprobs(False)
    spec, finish = logprobs(True)
    assert len(spec) == 80
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    # A verify pass decodes several positions of one sequence in one batch, and llama.cpp's CPU kernels
    # for several rows round differently from the one-row ones in the last bits (as batching several
    # sequences does): the logprobs agree closely, not bit for bit, and near-equal alternatives may swap.
    assert all(abs(a - b) < 0.1 for (_, a, _), (_, b, _) in zip(spec, plain, strict=True))
    assert finish.usage.accepted_tokens > 0


def test_context_end_with_speculation(engine: Engine):
    eng = Engine(LoadOptions(model_path=engine.model_path, n_seq_max=1, n_ctx=512, seed=0, spec="ngram"))
    try:
        prompt = chat(eng, COPY_PROMPTS[2])
        plain, f0 = run(eng, prompt, speculative=False, n=None, ignore_eos=True)
        spec, f1 = run(eng, prompt, speculative=True, n=None, ignore_eos=True)
        assert spec == plain and f1.reason == f0.reason == "length"
        assert len(prompt) + len(spec) == eng.n_ctx_seq
        assert f1.usage.accepted_tokens > 0
    finally:
        eng.close()


def test_spec_none_never_drafts(model_path):
    with Engine(LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=2048, seed=0, spec="none")) as eng:
        tokens, finish = run(eng, chat(eng, COPY_PROMPTS[0]), speculative=True, n=60)
        assert len(tokens) == 60 and finish.usage.drafted_tokens == 0


@pytest.mark.parametrize("task", ["rename"])
def test_qwen_edit_task_copies_its_input_exactly(qwen_spec: Engine, task: str):
    for seed in (1,):
        text, _ = edit_prompt(seed)
        prompt = qwen_spec.chat_tokens([{"role": "user", "content": text}])
        qwen_spec.clear_cache()
        stream = qwen_spec.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=250, logprobs=2,
                                                      speculative=False))
        rows = [lp for e in stream if getattr(e, "logprobs", None) for lp in e.logprobs]
        plain = [lp.token for lp in rows]
        spec, f1 = run(qwen_spec, prompt, speculative=True, n=250)
        assert f1.usage.accepted_tokens > 0.5 * len(spec)
        # Token for token the same, except where the model's two best tokens are a numerical tie: the
        # verify batch's last-bit rounding differs from one-token decoding (see test_logprobs_with_speculation),
        # and a near-tie can go either way, as it can when sequences are batched together.
        diverge = next((i for i, (a, b) in enumerate(zip(spec, plain, strict=True)) if a != b), None)
        if diverge is not None:
            top = rows[diverge].top
            assert top[0][1] - top[1][1] < 0.1, (diverge, top)  # the two best: a tie
            assert diverge > 20
