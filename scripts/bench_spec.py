#!/usr/bin/env python3
"""Speculative decoding, ggufchat against llama-server, on the same prompts, interleaved.

Servers (all started at once, each on a free port on 127.0.0.1, same model, context, threads, slots):

    gg-none     ggufchat serve MODEL --spec none
    gg-ngram    ggufchat serve MODEL --spec ngram
    ls-none     llama-server -m MODEL
    ls-simple   llama-server -m MODEL --spec-type ngram-simple
    ls-mod      llama-server -m MODEL --spec-type ngram-mod
    gg-draft    ggufchat serve MODEL -md DRAFT              (with --draft-model DRAFT)
    ls-draft    llama-server -m MODEL -md DRAFT --spec-type draft-simple (its default draft length)

Tasks, greedy (temperature 0), streamed:
- edit: a ~60-line Python file in the prompt, "rename function X to Y and print the whole file" (the
  output copies its input: what n-gram drafts are for). Each request gets its own file (names and
  numbers differ by round and client), so no server profits from an earlier round's output.
- chat: a short story on a topic, nothing to copy, up to 256 tokens (the model may end it sooner: no
  ignore_eos, whose text after the end of a reply is degenerate and repeats itself).

Each round runs every (task, clients) cell on every server in turn, the server order rotating from round
to round; C clients send one request each at once. Per server and cell it prints the decode speed per
stream (completion tokens after the first over first-to-last content chunk, mean over requests), the
aggregate (all completion tokens over the wall time from the first send to the last finish, prefill
included), the ratio of each to gg-none, and whether the text equals gg-none's (greedy: it must).

    python scripts/bench_spec.py [--model PATH] [--clients 1,8] [--rounds 3] [--threads 2]
        [--servers gg-none,gg-ngram,ls-none,ls-simple,ls-mod] [--tasks edit,chat] [--markdown FILE]
        [--draft-model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server  # noqa: E402
import bench_servers  # noqa: E402

from ggufchat.bench import edit_prompt  # noqa: E402

SERVERS = ["gg-none", "gg-ngram", "ls-none", "ls-simple", "ls-mod"]
LS_SPEC = {"ls-none": [], "ls-simple": ["--spec-type", "ngram-simple"], "ls-mod": ["--spec-type", "ngram-mod"],
           "ls-draft": ["--spec-type", "draft-simple"]}
DRAFT: str | None = None  # --draft-model
TOPICS = bench_server.TOPICS

def chat_prompt(seed: int) -> tuple[str, int]:
    return f"Write a short story about {TOPICS[seed % len(TOPICS)]}.", 256


TASKS = {"edit": edit_prompt, "chat": chat_prompt}


def command(name: str, s: bench_servers.Settings, port: int) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "-np", str(s.parallel), "-c", str(s.ctx),
              "-t", str(s.threads)]
    if name.startswith("gg-"):
        # this checkout's ggufchat (PYTHONPATH in start), whatever the virtual environment has installed
        draft = ["-md", DRAFT] if name == "gg-draft" else []
        return [sys.executable, "-m", "ggufchat", "serve", s.model, *common, "--spec", name[3:], *draft]
    draft = ["-md", DRAFT] if name == "ls-draft" else []
    return [s.llama_server, "-m", s.model, *common, "-kvu", *LS_SPEC[name], *draft]


def start(name: str, s: bench_servers.Settings, log_dir: Path, timeout: float):
    port = bench_servers.free_port()
    cmd = command(name, s, port)
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr)
    log = open(log_dir / f"{name}.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True, env=env)
    log.close()
    bench_servers._running[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; log: {log_dir / (name + '.log')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"{name} not ready after {timeout:g} s")


async def one(port: int, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    payload = {"model": "m", "stream": True, "temperature": 0, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": prompt}], "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    t0 = time.perf_counter()
    first = last = None
    text, tokens = [], None
    events = bench_server.stream_post("127.0.0.1", port, "/v1/chat/completions", payload, None)
    async for t, data in events:
        if data.strip() == "[DONE]":
            break
        event = json.loads(data)
        u = event.get("usage")
        if isinstance(u, dict) and u.get("completion_tokens") is not None:
            tokens = int(u["completion_tokens"])
        content = bench_server._content(event, "chat")
        if content:
            text.append(content)
            first = first or t
            last = t
    return {"start": t0, "end": time.perf_counter(), "first": first, "last": last, "tokens": tokens or 0,
            "text": "".join(text)}


async def cell(port: int, task: str, clients: int, rnd: int) -> dict:
    prompts = [TASKS[task](1000 * rnd + c) for c in range(clients)]
    results = await asyncio.gather(*(one(port, p, m, False) for p, m in prompts))
    decode = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in results
              if r["tokens"] > 1 and r["last"] and r["last"] > r["first"]]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"decode": statistics.mean(decode) if decode else 0.0,
            "aggregate": sum(r["tokens"] for r in results) / wall,
            "tokens": sum(r["tokens"] for r in results), "texts": [r["text"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--clients", default="1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8 * 4096)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--tasks", default="edit,chat")
    ap.add_argument("--markdown")
    ap.add_argument("--startup-timeout", type=float, default=120)
    ap.add_argument("--draft-model", help="a draft model for MODEL: adds gg-draft and ls-draft to the default servers")
    args = ap.parse_args(argv)
    global DRAFT
    DRAFT = args.draft_model
    if DRAFT and args.servers == ",".join(SERVERS):
        args.servers += ",gg-draft,ls-draft"
    if not DRAFT and any(n.endswith("-draft") for n in args.servers.split(",")):
        ap.error("gg-draft and ls-draft need --draft-model")
    model = args.model or subprocess.run([sys.executable, str(ROOT / "scripts" / "offline_models.py"),
                                          "qwen2.5-coder-0.5b"], capture_output=True, text=True,
                                         check=True).stdout.strip()
    s = bench_servers.Settings(model=model, ctx=args.ctx, threads=args.threads, parallel=args.parallel,
                               llama_server=str(ROOT / ".build" / "llama.cpp" / "bin" / "llama-server"))
    names = args.servers.split(",")
    levels = [int(c) for c in args.clients.split(",")]
    tasks = args.tasks.split(",")
    log_dir = ROOT / "artifacts" / "bench_spec" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = {}
    results: dict = {}  # (task, clients, server) -> [cell]
    try:
        for name in names:
            ports[name] = start(name, s, log_dir, args.startup_timeout)[1]
        for name in names:  # warm-up, not counted
            asyncio.run(one(ports[name], "Say hi.", 8, False))
        for rnd in range(args.rounds):
            for task in tasks:
                for c in levels:
                    order = names[rnd % len(names):] + names[:rnd % len(names)]
                    for name in order:
                        r = asyncio.run(cell(ports[name], task, c, rnd))
                        results.setdefault((task, c, name), []).append(r)
                        print(f"round {rnd + 1} {task} x{c} {name}: {r['decode']:.1f} t/s per stream, "
                              f"{r['aggregate']:.1f} aggregate", file=sys.stderr)
    finally:
        bench_servers.stop_all()
    header = ["task", "clients", "server", "t/s per stream", "vs gg-none", "aggregate t/s", "vs gg-none",
              "same text as gg-none"]
    rows = []
    for task in tasks:
        for c in levels:
            base = results.get((task, c, "gg-none"))
            for name in names:
                cells = results[(task, c, name)]
                dec = statistics.median(x["decode"] for x in cells)
                agg = statistics.median(x["aggregate"] for x in cells)
                if base:
                    bdec = statistics.median(x["decode"] for x in base)
                    bagg = statistics.median(x["aggregate"] for x in base)
                    same = all(x["texts"] == b["texts"] for x, b in zip(cells, base, strict=True))
                    ratios = [f"{dec / bdec:.2f}x", f"{agg / bagg:.2f}x", "yes" if same else "no"]
                else:
                    ratios = ["", "", ""]
                rows.append([task, str(c), name, f"{dec:.1f}", ratios[0], f"{agg:.1f}", ratios[1], ratios[2]])
    md = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    print(f"\nmodel {Path(model).name}, -t {args.threads}, -np {args.parallel}, median of {args.rounds} rounds\n")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
