"""Engine benchmark, shaped like llama.cpp's llama-bench (pp/tg) and llama-batched-bench (B sequences).

Prompts are random token ids, fresh for every run, so prefix reuse never turns a prefill test into a
cache hit; generation ignores end-of-generation tokens so every run decodes exactly n_gen tokens.
"""

from __future__ import annotations

import random
import statistics
import time

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams


def _prompt(rng: random.Random, n_vocab: int, n: int) -> list[int]:
    return [rng.randrange(n_vocab) for _ in range(n)]


def _run_batch(engine: Engine, prompts: list[list[int]], n_gen: int) -> tuple[float, float]:
    """Submit all prompts at once; return (prefill seconds, decode tokens/s over all sequences)."""
    t0 = time.perf_counter()
    streams = [engine.submit(GenerationRequest(p, SamplingParams.greedy(), max_tokens=n_gen, ignore_eos=True))
               for p in prompts]
    finishes = []
    for s in streams:
        for _ in s:
            pass
        finishes.append(s.finish)
    for f in finishes:
        if f.error is not None:
            raise f.error
    first = max(f.usage.t_first_token for f in finishes)
    end = max(f.usage.t_end for f in finishes)
    decoded = sum(f.usage.completion_tokens - 1 for f in finishes)  # the first token came from prefill
    return first - t0, decoded / (end - first) if end > first else 0.0


def ctx_per_seq(n_prompt: int, n_pp_batched: int, n_gen: int) -> int:
    """The context each sequence gets; scripts/bench_engine.py gives llama-batched-bench the same."""
    need = max(n_prompt, n_pp_batched) + n_gen + 16
    return (need + 255) // 256 * 256


def run_bench(options: LoadOptions, *, n_prompt: int = 512, n_gen: int = 128, n_pp_batched: int = 128,
              counts: list[int] | None = None, repetitions: int = 3) -> list[dict]:
    counts = counts or [1, 4, 8, 16]
    per_seq = ctx_per_seq(n_prompt, n_pp_batched, n_gen)
    options.n_seq_max = max(counts)
    options.n_ctx = per_seq * options.n_seq_max
    options.n_batch = max(options.n_batch, n_prompt, n_pp_batched * max(counts))
    rng = random.Random(1234)
    rows: list[dict] = []
    with Engine(options) as engine:
        n_vocab = engine.n_vocab
        _run_batch(engine, [_prompt(rng, n_vocab, 32)], 16)  # warm-up, as llama-bench does

        def median(fn) -> float:
            return statistics.median(fn() for _ in range(repetitions))

        pp = median(lambda: n_prompt / _run_batch(engine, [_prompt(rng, n_vocab, n_prompt)], 1)[0])
        rows.append(_row(f"pp{n_prompt}", 1, n_prompt, n_prompt / pp, pp))
        tg = median(lambda: _run_batch(engine, [_prompt(rng, n_vocab, 1)], n_gen + 1)[1])
        rows.append(_row(f"tg{n_gen}", 1, n_gen, n_gen / tg, tg))
        for b in counts:
            results = [_run_batch(engine, [_prompt(rng, n_vocab, n_pp_batched) for _ in range(b)], n_gen + 1)
                       for _ in range(repetitions)]
            pp_s = statistics.median(r[0] for r in results)
            tg_s = statistics.median(r[1] for r in results)
            rows.append(_row(f"batched pp{n_pp_batched}", b, b * n_pp_batched, pp_s, b * n_pp_batched / pp_s))
            rows.append(_row(f"batched tg{n_gen}", b, b * n_gen, b * n_gen / tg_s, tg_s))
    return rows


def _row(test: str, sequences: int, tokens: int, seconds: float, tps: float) -> dict:
    return {"test": test, "sequences": sequences, "tokens": tokens, "seconds": seconds, "tokens_per_second": tps}
