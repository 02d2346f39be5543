#!/usr/bin/env python3
"""Embeddings throughput: `ggufchat serve` against llama-server (`--embedding`), one after the other, on
the same model, threads and texts, through the same OpenAI route (POST /v1/embeddings):

    ggufchat serve MODEL --host 127.0.0.1 --port P -np 1 -t THREADS
    .build/llama.cpp/bin/llama-server -m MODEL --host 127.0.0.1 --port P --embedding --pooling mean \\
        -c 2048 -b 2048 -ub 2048 -np 8 -t THREADS

One client sends --texts distinct sentences in requests of --per-request texts, --rounds times per server
(the best round counts), and the two servers' vectors for the same texts are compared (their lowest
cosine similarity: both normalise, so it is 1.0 up to float noise when both compute the same thing).

    python scripts/bench_embed.py [--model PATH] [--tools .build/llama.cpp/bin] [--texts 256]
        [--per-request 32] [--words 40] [--threads 2] [--rounds 3]

The default model is all-MiniLM-L6-v2 (scripts/offline_models.py). Without llama-server only ggufchat
is measured. Each server's process group is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river mountain data engine quiet green market music travel window coffee garden science "
         "history paper light winter city ocean forest computer language morning story bridge").split()


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/embeddings", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path):
    print(f"== {' '.join(cmd)}", file=sys.stderr)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Error: the server did not start; log: {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            time.sleep(0.25)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
                break


def measure(url: str, items: list[str], per_request: int, rounds: int) -> tuple[float, int, list[list[float]]]:
    post(url, {"input": items[:2]})  # warm-up: contexts and buffers are made on first use
    best, tokens, vectors = float("inf"), 0, []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tokens, vectors = 0, []
        for i in range(0, len(items), per_request):
            reply = post(url, {"input": items[i:i + per_request], "encoding_format": "float"})
            tokens += reply["usage"]["prompt_tokens"]
            vectors += [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]
        best = min(best, time.perf_counter() - t0)
    return best, tokens, vectors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tools", default=str(ROOT / ".build" / "llama.cpp" / "bin"))
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--per-request", type=int, default=32)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import offline_models

        args.model = str(offline_models.ensure_converted("all-minilm-l6-v2"))
    items = texts(args.texts, args.words)
    logs = Path(tempfile.mkdtemp(prefix="bench_embed-"))
    exe = ROOT / ".venv" / "bin" / "ggufchat"
    commands = {"ggufchat serve": lambda p: [str(exe) if exe.exists() else "ggufchat", "serve", args.model,
                                             "--host", "127.0.0.1", "--port", str(p), "-np", "1",
                                             "-t", str(args.threads)]}
    llama_server = Path(args.tools) / "llama-server"
    if os.access(llama_server, os.X_OK):
        commands["llama-server"] = lambda p: [str(llama_server), "-m", args.model, "--host", "127.0.0.1",
                                              "--port", str(p), "--embedding", "--pooling", "mean", "-c", "2048",
                                              "-b", "2048", "-ub", "2048", "-np", "8", "-t", str(args.threads)]
    else:
        print(f"{llama_server} not found: measuring ggufchat only", file=sys.stderr)
    results = {}
    for name, command in commands.items():
        port = free_port()
        with server(command(port), port, logs / f"{name.split()[0]}.log") as url:
            results[name] = measure(url, items, args.per_request, args.rounds)
    print(f"{args.texts} texts of {args.words} words, {args.per_request} per request, one client, "
          f"-t {args.threads}, best of {args.rounds}; model {Path(args.model).name}")
    print(f"{'server':<16}{'seconds':>9}{'texts/s':>9}{'tokens/s':>10}")
    for name, (seconds, tokens, _) in results.items():
        print(f"{name:<16}{seconds:>9.2f}{args.texts / seconds:>9.1f}{tokens / seconds:>10.0f}")
    if len(results) == 2:
        (_, ta, a), (_, tb, b) = results.values()
        worst = min(sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(a, b, strict=True))
        print(f"same token counts: {ta == tb}; lowest cosine between the two servers' vectors: {worst:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
