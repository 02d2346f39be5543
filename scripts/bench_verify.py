#!/usr/bin/env python3
"""What verifying a draft costs: `llama_decode` of k positions of one sequence, with logits at every
position (what verifying a k-token draft needs) against logits at the last one only (a prompt chunk),
after a prompt. It splits a verify step into the transformer and the output head, and gives the bound
on speculation's gain at full acceptance (k tokens per step of k positions against one per plain step).

    python scripts/bench_verify.py [--model PATH] [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from ggufchat.engine.loader import LoadedModel, LoadOptions  # noqa: E402
from ggufchat.models.embedded import embedded_model_path  # noqa: E402

PROMPT = 300
SIZES = (1, 2, 4, 8, 16)


def measure(model: LoadedModel, sizes: tuple[int, ...], reps: int, *, last_too: bool = True
            ) -> list[tuple[int, float, float | None]]:
    """(k, ms with logits at every position, ms with logits at the last only or None) per size: the
    median of `reps` decodes of k positions after a PROMPT-token prompt, each removed again."""
    memory = llama_cpp.llama_get_memory(model.ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(k: int, start: int, every: bool) -> float:
        batch.n_tokens = k
        for i in range(k):
            batch.token[i] = 1000 + (start + i) % 1000
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if every or i == k - 1 else 0
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(model.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - t0

    def median_ms(k: int, every: bool) -> float:
        times = []
        for _ in range(reps):
            times.append(decode(k, PROMPT, every))
            llama_cpp.llama_memory_seq_rm(memory, 0, PROMPT, -1)
        return statistics.median(times) * 1000

    try:
        llama_cpp.llama_memory_seq_rm(memory, 0, 0, -1)
        for start in range(0, PROMPT, 100):
            decode(100, start, False)
        return [(k, median_ms(k, True), median_ms(k, False) if last_too else None) for k in sizes]
    finally:
        llama_cpp.llama_batch_free(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    model = LoadedModel(LoadOptions(model_path=Path(args.model or embedded_model_path()), n_seq_max=1,
                                    n_ctx=4096, n_threads=args.threads))
    try:
        rows = measure(model, SIZES, args.reps)
        one = rows[0][1]
        print(f"{Path(model.path).name}, -t {args.threads}, after a {PROMPT}-token prompt, median of {args.reps}")
        head_line = ("positions", "logits every", "logits last", "head/row", "bound at full acceptance")
        print("  ".join(f"{h:>{w}}" for h, w in zip(head_line, (9, 12, 11, 8, 24), strict=True)))
        for k, every, last in rows:
            head = (every - last) / (k - 1) if k > 1 else 0.0
            bound = k * one / every  # k tokens (k - 1 drafted, all kept, + 1) per verify step, against 1
            print(f"{k:>9}  {every:>9.1f} ms  {last:>8.1f} ms  {head:>5.1f} ms  {bound:>23.2f}x")
    finally:
        model.close()


if __name__ == "__main__":
    main()
