#!/usr/bin/env python3
"""ggufchat's engine side by side with llama.cpp's llama-bench and llama-batched-bench, in one run.

Each tool runs in its own process, on the same model and thread count. Shared 2-core machines drift by
+-15% over minutes, so the tools take turns for several rounds and the table shows medians: tokens/s
of each, and the median of the per-round ratios ggufchat / llama.cpp.

    python scripts/bench_engine.py --tools .build/llama.cpp/bin [--model M] [--threads 2] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TARGETS = {("tg", 1): 0.97, ("tg", 8): 0.95}


def run_json_lines(cmd: list[str]) -> list[dict]:
    print("$ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = proc.stdout.strip()
    if out.startswith("["):
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def llama_bench(tools: Path, model: str, threads: int, reps: int) -> dict:
    rows = run_json_lines([str(tools / "llama-bench"), "-m", model, "-t", str(threads), "-p", "512",
                           "-n", "128", "-r", str(reps), "-o", "json"])
    result = {}
    for r in rows:
        if r.get("n_prompt") and not r.get("n_gen"):
            result["pp512"] = r["avg_ts"]
        elif r.get("n_gen") and not r.get("n_prompt"):
            result["tg128"] = r["avg_ts"]
    return result


def batched_bench(tools: Path, model: str, threads: int, counts: str) -> dict:
    from ggufchat.bench import ctx_per_seq

    n_max = max(int(c) for c in counts.split(","))
    # The same context per sequence as `ggufchat bench` uses: attention cost grows with it.
    n_ctx = ctx_per_seq(512, 128, 128) * n_max
    rows = run_json_lines([str(tools / "llama-batched-bench"), "-m", model, "-t", str(threads),
                           "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-npp", "128",
                           "-ntg", "128", "-npl", counts, "--output-format", "jsonl"])
    return {int(r["pl"]): (r["speed_pp"], r["speed_tg"]) for r in rows}


def ggufchat_bench(model: str, threads: int, counts: str, reps: int) -> list[dict]:
    exe = Path(sys.executable).parent / "ggufchat"
    return run_json_lines([str(exe), "bench", model, "-t", str(threads), "-npl", counts, "-r", str(reps),
                           "--json"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", type=Path, default=Path(".build/llama.cpp/bin"))
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    ap.add_argument("--parallel", default="1,4,8,16")
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions per round")
    ap.add_argument("--rounds", type=int, default=3, help="turns each tool takes")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args()
    if args.model is None:
        from ggufchat.models.embedded import embedded_model_path

        args.model = str(embedded_model_path())
    for tool in ("llama-bench", "llama-batched-bench"):
        if not (args.tools / tool).is_file():
            sys.exit(f"Error: {args.tools / tool} is missing. Build it with `make llama-tools`.")

    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
        ours = {(r["test"], r["sequences"]): r["tokens_per_second"]
                for r in ggufchat_bench(args.model, args.threads, args.parallel, 1)}
        single = llama_bench(args.tools, args.model, args.threads, args.reps)
        batched = batched_bench(args.tools, args.model, args.threads, args.parallel)
        samples.setdefault(("pp512", 1), []).append((ours[("pp512", 1)], single["pp512"]))
        samples.setdefault(("tg128", 1), []).append((ours[("tg128", 1)], single["tg128"]))
        for n, (pp, tg) in batched.items():
            samples.setdefault(("pp128 batched", n), []).append((ours[("batched pp128", n)], pp))
            samples.setdefault(("tg128 batched", n), []).append((ours[("batched tg128", n)], tg))

    rows = []  # (test, sequences, ggufchat, reference, median ratio, tool, target)
    for (test, n), pairs in samples.items():
        tool = "llama-bench" if n == 1 and "batched" not in test else "llama-batched-bench"
        target = TARGETS.get(("tg", n)) if test.startswith("tg") and (n == 8 or "batched" not in test) else None
        rows.append((test, n, statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                     statistics.median(p[0] / p[1] for p in pairs), tool, target))

    lines = [f"model: {Path(args.model).name}, threads: {args.threads}, rounds: {args.rounds} (medians)",
             "",
             "| test | sequences | ggufchat t/s | llama.cpp t/s | tool | ratio | target |",
             "| --- | ---: | ---: | ---: | --- | ---: | --- |"]
    failed = []
    for test, n, mine, ref, ratio, tool, target in rows:
        verdict = ""
        if target is not None:
            ok = ratio >= target
            verdict = f">= {target:.2f} {'ok' if ok else 'MISSED'}"
            if not ok:
                failed.append(test)
        ref_text = f"{ref:.1f}" if ref else "-"
        lines.append(f"| {test} | {n} | {mine:.1f} | {ref_text} | {tool} | {ratio:.3f} | {verdict} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if failed:
        print(f"targets missed: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
