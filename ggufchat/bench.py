"""Engine benchmark, shaped like llama.cpp's llama-bench (pp/tg) and llama-batched-bench (B sequences).

Prompts are random token ids, fresh for every run, so prefix reuse never turns a prefill test into a
cache hit; generation ignores end-of-generation tokens so every run decodes exactly n_gen tokens.

The edit test is a real chat request whose reply copies its prompt (rename a function in a 60-line file
and print the file): what speculative decoding is for. Run it with and without --spec to compare.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams

_NOUNS = ["order", "invoice", "customer", "item", "payment", "refund", "account", "ledger", "basket", "coupon"]
_VERBS = ["compute", "collect", "gather", "measure", "build", "check", "merge", "scale", "format", "render"]


def edit_prompt(seed: int) -> tuple[str, int]:
    """A ~60-line Python module and the instruction to rename one of its functions; (prompt, max_tokens)."""
    rng = random.Random(seed)
    nouns = rng.sample(_NOUNS, 6)
    verbs = rng.sample(_VERBS, 6)
    old = f"{verbs[0]}_{nouns[0]}_total"
    new = f"{verbs[1]}_{nouns[0]}_sum"
    k = rng.randint(2, 9)
    lines = ['"""Helpers for the ' + nouns[1] + ' module."""', "", "import math", "from dataclasses import dataclass",
             "", "", "@dataclass", f"class {nouns[2].title()}:", "    name: str", "    price: float",
             "    quantity: int = 1", "", "", f"def {old}(items):", f'    """The total of {nouns[0]} items."""',
             "    total = 0.0", "    for item in items:", "        total += item.price * item.quantity",
             "    return round(total, 2)", ""]
    for i, (v, n) in enumerate(zip(verbs[2:], nouns[3:], strict=False)):
        lines += ["", f"def {v}_{n}(items, factor={k + i}):", f"    base = {old}(items)",
                  f"    if base > {100 * (i + k)}:", f"        return base * factor - {i + 1}",
                  "    return math.sqrt(base) + factor", ""]
    lines += ["", "def report(items):", f"    total = {old}(items)", '    print(f"total: {total}")',
              f"    print(f\"scaled: {{{verbs[2]}_{nouns[3]}(items)}}\")", "    return total", "",
              "", 'if __name__ == "__main__":',
              f'    sample = [{nouns[2].title()}("a", 1.5, 2), {nouns[2].title()}("b", {k}.25)]',
              "    report(sample)", f"    print({old}(sample))"]
    code = "\n".join(lines)
    prompt = (f"Rename the function `{old}` to `{new}` everywhere in this file and print the whole updated "
              f"file, nothing else.\n\n```python\n{code}\n```")
    return prompt, 1024  # the file is ~700 tokens: room to print it, and to see a model that does not stop


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
              counts: list[int] | None = None, repetitions: int = 3, edit: bool = True) -> list[dict]:
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
    if edit:
        # Its own engine: the edit prompt and reply need a longer context than the tests above, whose
        # context matches what scripts/bench_engine.py gives llama.cpp's tools.
        edit_options = dataclasses.replace(options, n_seq_max=1, n_ctx=EDIT_CTX)
        with Engine(edit_options) as engine:
            rows.append(_edit_row(engine, repetitions))
    return rows


EDIT_CTX = 2048


def _edit_row(engine: Engine, repetitions: int) -> dict:
    """The edit task, greedy, one sequence: median decode tokens/s over `repetitions` files."""
    runs = []
    for seed in range(1, repetitions + 1):
        text, max_tokens = edit_prompt(seed)
        engine.clear_cache()
        stream = engine.submit(GenerationRequest(engine.chat_tokens([{"role": "user", "content": text}]),
                                                 SamplingParams.greedy(), max_tokens=max_tokens))
        for _ in stream:
            pass
        if stream.finish.error is not None:
            raise stream.finish.error
        u = stream.finish.usage
        runs.append((u.completion_tokens, u.t_end - u.t_first_token, u.drafted_tokens, u.accepted_tokens))
    n, seconds, drafted, accepted = sorted(runs, key=lambda r: (r[0] - 1) / max(r[1], 1e-9))[len(runs) // 2]
    row = _row("edit", 1, n, seconds, (n - 1) / seconds if seconds > 0 else 0.0)
    row["drafted"], row["accepted"] = drafted, accepted
    return row


def _row(test: str, sequences: int, tokens: int, seconds: float, tps: float) -> dict:
    return {"test": test, "sequences": sequences, "tokens": tokens, "seconds": seconds, "tokens_per_second": tps}
