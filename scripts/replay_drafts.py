#!/usr/bin/env python3
"""Ways of choosing n-gram drafts, replayed on recorded greedy replies: the verify time each needs for
the same tokens, as a ratio to decoding without drafts.

A greedy reply is the same with or without speculation, so a reply recorded once (its prompt and output
tokens) tells what any draft would have had accepted, and one recording judges many policies without
running the model again. A step's cost by its batch positions is measured on the same model
(`llama_decode` of k positions with logits at each, as bench_verify.py). Policies, all with the same
lookup (the tokens after the most recent earlier occurrence of the longest 4/3/2-token n-gram):

    ggufchat    the engine's own NgramDrafter (engine/speculative.py), priced on the measured costs
    fixed       as many tokens as allowed (--draft-max) whenever the n-gram matches: llama.cpp's way
    oracle      the best length for each step knowing the reply: what a perfect length rule would get

Tasks: `edit` (bench.py's rename-a-function file, the output copies the prompt), `story` (a short story,
greedy: little to copy but the model's own repeats), `sampled` (the same stories sampled at temperature
0.9 and replayed as if greedy: text with next to nothing to copy, where drafts must not cost).
Recordings are cached under ~/.cache/ggufchat/replays, keyed by the model file's checksum.

    python scripts/replay_drafts.py [--model PATH] [--replies 8] [--tasks edit,story,sampled] [--threads 2]
        [--draft-max 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_server  # noqa: E402
import bench_verify  # noqa: E402

from ggufchat.bench import edit_prompt  # noqa: E402
from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams  # noqa: E402
from ggufchat.engine.loader import LoadedModel  # noqa: E402
from ggufchat.engine.speculative import NgramDrafter  # noqa: E402
from ggufchat.models.store import sha256_file  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggufchat" / "replays"
TASKS = ("edit", "story", "sampled")


def request(task: str, i: int) -> tuple[str, SamplingParams, int]:
    if task == "edit":
        text, max_tokens = edit_prompt(i + 1)
        return text, SamplingParams.greedy(), max_tokens
    topic = bench_server.TOPICS[i % len(bench_server.TOPICS)]
    sampling = SamplingParams.greedy() if task == "story" else SamplingParams(temperature=0.9, seed=i)
    return f"Write a short story about {topic}.", sampling, 256


def record(model: Path, tasks: list[str], replies: int, threads: int, max_tokens: int | None) -> dict:
    """{task: [{"prompt": [...], "output": [...]}, ...]}, from the cache or recorded now."""
    key = f"{model.name}-{sha256_file(model)[:16]}-{replies}-{max_tokens or 'full'}"
    found: dict[str, list] = {}
    for task in tasks:
        f = CACHE / f"{key}-{task}.json"
        if f.is_file():
            found[task] = json.loads(f.read_text())
    todo = [t for t in tasks if t not in found]
    if todo:
        with Engine(LoadOptions(model_path=model, n_seq_max=1, n_ctx=4096, n_threads=threads, seed=0)) as engine:
            for task in todo:
                runs = []
                for i in range(replies):
                    text, sampling, limit = request(task, i)
                    prompt = engine.chat_tokens([{"role": "user", "content": text}])
                    stream = engine.submit(GenerationRequest(prompt, sampling, max_tokens=max_tokens or limit,
                                                             speculative=False))
                    runs.append({"prompt": prompt, "output": stream.tokens()})
                    print(f"recorded {task} {i + 1}/{replies}: {len(runs[-1]['output'])} tokens", file=sys.stderr)
                CACHE.mkdir(parents=True, exist_ok=True)
                tmp = CACHE / f"{key}-{task}.json.tmp"
                tmp.write_text(json.dumps(runs))
                tmp.replace(CACHE / f"{key}-{task}.json")
                found[task] = runs
    return found


def right(draft: list[int], output: list[int], at: int) -> int:
    """How many of `draft` equal the reply's tokens from position `at` on."""
    n = 0
    while n < len(draft) and at + n < len(output) and draft[n] == output[at + n]:
        n += 1
    return n


Policy = Callable[[NgramDrafter, int, list[int], int, Callable[[int], float]], list[int]]


def ggufchat(d: NgramDrafter, limit: int, output: list[int], at: int, cost: Callable[[int], float]) -> list[int]:
    return d.draft(limit, cost, 1)


def fixed(d: NgramDrafter, limit: int, output: list[int], at: int, cost: Callable[[int], float]) -> list[int]:
    return d.lookup(limit)


def oracle(d: NgramDrafter, limit: int, output: list[int], at: int, cost: Callable[[int], float]) -> list[int]:
    candidate = d.lookup(limit)
    good = right(candidate, output, at)
    # k drafted tokens of which all `good` ones are kept: the most tokens per second of the step.
    best = max(range(good + 1), key=lambda k: (k + 1) / cost(1 + k))
    return candidate[:best]


POLICIES: dict[str, Policy] = {"ggufchat": ggufchat, "fixed": fixed, "oracle": oracle}


def replay(runs: list[dict], policy: Policy, cost: Callable[[int], float], draft_max: int) -> dict:
    plain = spent = 0.0
    drafted = accepted = steps = 0
    for run in runs:
        prompt, output = run["prompt"], run["output"]
        if len(output) < 2:
            continue
        d = NgramDrafter(prompt)
        d.push(output[0])  # the first token comes from the prompt's step
        i = 0  # output[i] is the next token: it goes into the step with the draft
        while i < len(output) - 1:
            limit = min(draft_max, len(output) - 1 - i)
            draft = policy(d, limit, output, i + 1, cost)
            kept = right(draft, output, i + 1)
            if draft:
                d.update(len(draft), kept)
            else:
                d.watch()  # as the engine does: the draft not made is judged on the tokens that come
            spent += cost(1 + len(draft))
            steps += 1
            for tok in output[i + 1:i + 2 + kept]:  # the kept drafted tokens and the step's own pick
                d.push(tok)
            i += kept + 1
            drafted += len(draft)
            accepted += kept
        plain += cost(1) * (len(output) - 1)
    return {"ratio": plain / spent if spent else 1.0, "drafted": drafted, "accepted": accepted, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: Qwen2.5-Coder-0.5B, scripts/offline_models.py)")
    ap.add_argument("--replies", type=int, default=8, help="replies recorded per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="decodes per step size measured (median)")
    ap.add_argument("--max-tokens", type=int, default=None, help="cut each reply short (quick runs)")
    ap.add_argument("--draft-max", type=int, default=16, help="the longest draft (the engine's --draft-max)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if unknown := [t for t in tasks if t not in TASKS]:
        ap.error(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    if args.model:
        model = Path(args.model)
    else:
        import offline_models

        model = offline_models.ensure("qwen2.5-coder-0.5b")
    runs = record(model, tasks, args.replies, args.threads, args.max_tokens)

    loaded = LoadedModel(LoadOptions(model_path=model, n_seq_max=1, n_ctx=4096, n_threads=args.threads))
    try:
        sizes = tuple(range(1, args.draft_max + 2))
        measured = {k: ms for k, ms, _ in bench_verify.measure(loaded, sizes, args.reps, last_too=False)}
    finally:
        loaded.close()

    def cost(n: int) -> float:
        return measured[min(n, args.draft_max + 1)]

    results = {task: {name: replay(runs[task], policy, cost, args.draft_max) for name, policy in POLICIES.items()}
               for task in tasks}
    print(f"{model.name}, -t {args.threads}, {args.replies} replies per task, --draft-max {args.draft_max}; "
          "a step of k positions: " + ", ".join(f"{k}: {measured[k]:.1f} ms" for k in sorted(measured)
                                                 if k & (k - 1) == 0 or k == args.draft_max + 1))
    print(f"{'task':<8} {'policy':<9} {'vs no drafts':>12} {'steps':>6} {'accepted/drafted':>17}")
    for task, by_policy in results.items():
        tokens = sum(max(len(r["output"]) - 1, 0) for r in runs[task])
        print(f"{task:<8} {'none':<9} {1.0:>11.2f}x {tokens:>6} {'-':>17}")
        for name, r in by_policy.items():
            print(f"{task:<8} {name:<9} {r['ratio']:>11.2f}x {r['steps']:>6} {r['accepted']:>8}/{r['drafted']:<8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.name, "step_ms": measured, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
