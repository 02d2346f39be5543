"""The batch loop on the real model: determinism, batch invariance, cancellation, prefix reuse."""

from __future__ import annotations

import threading

import pytest

from ggufchat.engine import Delta, Engine, GenerationRequest, SamplingParams
from ggufchat.engine.scheduler import handoff_wait
from ggufchat.errors import ContextOverflow, InvalidParameter
from tests.conftest import N_SEQ, chat

PROMPTS = [
    "Tell me a story about a cat.",
    "What is 2+2?",
    "Write a poem about the sea.",
    "Explain gravity to a child.",
    "List three colours.",
    "What is the capital of Italy?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]


def greedy(tokens: list[int], n: int = 48) -> GenerationRequest:
    return GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=n)


def test_greedy_is_deterministic(fresh: Engine):
    prompt = chat(fresh, "Name a fruit and describe it.")
    first = fresh.submit(greedy(prompt)).tokens()
    fresh.clear_cache()
    second = fresh.submit(greedy(prompt)).tokens()
    assert len(first) > 10
    assert first == second


def test_batched_sequences_equal_sequential(fresh: Engine):
    prompts = [chat(fresh, p) for p in PROMPTS[:N_SEQ]]
    alone = []
    for p in prompts:
        fresh.clear_cache()
        alone.append(fresh.submit(greedy(p)).tokens())
    fresh.clear_cache()
    steps_before = fresh.scheduler.steps
    streams = [fresh.submit(greedy(p)) for p in prompts]
    together = [s.tokens() for s in streams]
    assert together == alone
    assert all(s.finish.usage.cached_tokens == 0 for s in streams)
    # 8 x 48 tokens in far fewer than 8 x 48 decode steps: they really shared batches.
    assert fresh.scheduler.steps - steps_before < 2 * 48


def test_cancel_one_leaves_others_unchanged(fresh: Engine):
    prompts = [chat(fresh, p) for p in PROMPTS[:4]]
    expected = [fresh.submit(greedy(p, 40)).tokens() for p in prompts]
    fresh.clear_cache()
    streams = [fresh.submit(greedy(p, 40)) for p in prompts]
    victim = streams[1]
    seen = []
    for event in victim:
        if isinstance(event, Delta):
            seen.extend(event.token_ids)
            if len(seen) >= 5:
                victim.cancel()
    assert victim.finish.reason == "cancelled"
    assert 5 <= len(seen) < len(expected[1])
    assert seen == expected[1][: len(seen)]
    others = [s.tokens() for i, s in enumerate(streams) if i != 1]
    assert others == [e for i, e in enumerate(expected) if i != 1]


def test_cancel_from_another_thread_while_waiting_in_queue(fresh: Engine):
    # More requests than slots: the extra ones wait, and can be cancelled before they start.
    prompts = [chat(fresh, p) for p in PROMPTS] + [chat(fresh, "One more question.")]
    streams = [fresh.submit(greedy(p, 30)) for p in prompts]
    last = streams[-1]
    threading.Thread(target=last.cancel).start()
    assert last.text() == ""
    assert last.finish.reason == "cancelled"
    for s in streams[:-1]:
        s.text()
        assert s.finish.reason in ("length", "stop")


def test_prefix_reuse_skips_the_shared_prefill(fresh: Engine):
    system = "You are a terse assistant. Answer in one short sentence."
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "What is ice?"}]
    stream = fresh.submit(greedy(fresh.chat_tokens(turn1), 24))
    reply = stream.text()
    assert stream.finish.usage.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And steam?"}]
    tokens2 = fresh.chat_tokens(turn2)
    cached = fresh.submit(greedy(tokens2, 24))
    cached_tokens = cached.tokens()
    n_cached = cached.finish.usage.cached_tokens
    # Everything up to the end of turn 1's prompt is reused, at least.
    assert n_cached >= len(fresh.chat_tokens(turn1)) - 1
    # And reuse does not change the answer.
    fresh.clear_cache()
    cold = fresh.submit(greedy(tokens2, 24))
    assert cold.tokens() == cached_tokens
    assert cold.finish.usage.cached_tokens == 0


def test_max_tokens_gives_length(engine: Engine):
    stream = engine.submit(greedy(chat(engine, "Count from one to fifty in words."), 7))
    assert len(stream.tokens()) == 7
    assert stream.finish.reason == "length"
    assert stream.finish.usage.completion_tokens == 7


def test_end_of_generation_gives_stop(engine: Engine):
    stream = engine.submit(greedy(chat(engine, "Say hello."), 400))
    text = stream.text()
    assert stream.finish.reason == "stop"
    assert "<|im_end|>" not in text and text.strip()


def test_ignore_eos_runs_to_max_tokens(engine: Engine):
    stream = engine.submit(GenerationRequest(chat(engine, "Say hello."), SamplingParams.greedy(),
                                             max_tokens=300, ignore_eos=True))
    stream.text()
    assert stream.finish.reason == "length"
    assert stream.finish.usage.completion_tokens == 300


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine: Engine):
    prompt = chat(engine, "Write a sentence about dogs.")
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = engine.submit(GenerationRequest(prompt, sampled, max_tokens=40)).tokens()
    b = engine.submit(GenerationRequest(prompt, sampled, max_tokens=40)).tokens()
    other = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=1.0, top_k=0, top_p=1.0,
                                                                   min_p=0.0, seed=7), max_tokens=40)).tokens()
    assert a == b
    assert a != other


def test_repeat_penalty_changes_output(engine: Engine):
    prompt = chat(engine, "Repeat the word 'yes' many times.")
    plain = engine.submit(greedy(prompt, 40)).tokens()
    penalised = engine.submit(GenerationRequest(
        prompt, SamplingParams(temperature=0, repeat_penalty=1.5, presence_penalty=0.5), max_tokens=40)).tokens()
    assert plain != penalised


def test_prompt_longer_than_context_is_refused(engine: Engine):
    with pytest.raises(ContextOverflow) as info:
        engine.submit(greedy([1] * engine.n_ctx_seq))
    assert info.value.n_ctx == engine.n_ctx_seq


def test_generation_stops_when_the_sequence_context_is_full(engine: Engine):
    prompt = [1] * (engine.n_ctx_seq - 5)
    stream = engine.submit(GenerationRequest(prompt, SamplingParams.greedy(), ignore_eos=True))
    stream.text()
    assert stream.finish.reason == "length"
    assert stream.finish.usage.completion_tokens == 5


@pytest.mark.parametrize("bad", [
    {"max_tokens": -1}, {"sampling": SamplingParams(temperature=-1)}, {"sampling": SamplingParams(top_p=2)},
    {"prompt_tokens": []}, {"prompt_tokens": [10**9]},
])
def test_bad_requests_are_refused(engine: Engine, bad: dict):
    request = greedy(chat(engine, "hi"))
    for key, value in bad.items():
        setattr(request, key, value)
    with pytest.raises(InvalidParameter):
        engine.submit(request)


def test_async_streams_match_sync_and_cancel(fresh: Engine):
    import asyncio

    prompts = [chat(fresh, p) for p in PROMPTS[:3]]
    expected = [fresh.submit(greedy(p, 24)).tokens() for p in prompts]

    async def main():
        streams = [fresh.submit_async(greedy(p, 24)) for p in prompts]

        async def collect(s):
            return [t async for e in s if isinstance(e, Delta) for t in e.token_ids]

        got = await asyncio.gather(*(collect(s) for s in streams))
        doomed = fresh.submit_async(greedy(prompts[0], 200))
        async for event in doomed:
            if isinstance(event, Delta):
                doomed.cancel()
        return got, doomed.finish.reason

    got, reason = asyncio.run(main())
    assert got == expected
    assert reason == "cancelled"


def test_batch_holds_sequences_in_slot_order_whatever_order_slots_were_taken(fresh: Engine):
    # llama.cpp decodes a batch whose sequence ids are out of order markedly slower (see Scheduler._bind),
    # and slots are taken least-recently-used first: make the LRU order the reverse of the id order.
    seen: list[list[int]] = []
    for i, slot in enumerate(fresh.scheduler.slots):
        slot.last_used = float(N_SEQ - i)
    streams = [fresh.submit(GenerationRequest(chat(fresh, p), SamplingParams.greedy(), max_tokens=4))
               for p in PROMPTS]
    while any(s.finish is None for s in streams):
        fresh.scheduler.call(lambda: seen.append(fresh.scheduler.batch_order())).wait()
        for s in streams:
            if s.finish is None:
                next(iter(s), None)
    assert any(len(ids) > 1 for ids in seen)
    assert all(ids == sorted(ids) for ids in seen)


def test_the_engine_waits_for_the_event_loop_only_when_decoding_takes_every_cpu():
    # -t 2 on 2 CPUs: the loop's writes would preempt a decode thread, so the engine waits for them.
    assert handoff_wait(2, 2) > 0 and handoff_wait(16, 8) > 0
    # A CPU to spare: the loop writes there while the next batch decodes.
    assert handoff_wait(1, 2) == 0 and handoff_wait(4, 8) == 0


def test_a_new_sequence_keeps_the_busy_sequence_ids_in_one_run():
    # llama.cpp puts only consecutive sequence ids in one ubatch: a gap costs a pass over the weights
    # per step (4 sequences in slots 0,2,4,6 decoded 50% slower than in 0-3, measured).
    from ggufchat.engine.scheduler import FRAGMENT_TOKENS, Slot, pick_slot

    system = list(range(100, 140))  # a shared system prompt, cached in every slot that served one
    slots = [Slot(i, tokens=list(system), last_used=float(i)) for i in range(8)]
    slots[3].busy = True
    prompt = system + [7, 8, 9]
    # Next to the busy slot, not the least recently used (slot 0) far away.
    assert pick_slot(slots, prompt).seq_id in (2, 4)
    slots[5].busy = True  # busy 3 and 5: slot 4 joins them into one run
    assert pick_slot(slots, prompt).seq_id == 4
    # A long cached conversation is worth the split: re-reading it would cost more than the gap.
    # (slot 4 would merge two runs, slot 0 start a third: two passes, 2 * FRAGMENT_TOKENS)
    slots[0].tokens = list(system) + list(range(2 * FRAGMENT_TOKENS + 50))
    assert pick_slot(slots, slots[0].tokens + [1, 2]).seq_id == 0
    # With nothing busy, the longest cached prefix wins as before (the next turn of a chat).
    for s in slots:
        s.busy = False
    slots[6].tokens = list(system) + [1, 1, 1]
    assert pick_slot(slots, system + [1] * 5).seq_id == 6
    # All else equal, the least recently used slot.
    assert pick_slot(slots, [5, 5]).seq_id == 0
