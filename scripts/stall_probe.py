#!/usr/bin/env python3
"""Stall probe: does one heavy request slow /health or other clients' streams? (issue 14)

The requirement: /health keeps answering within ~50 ms, and other streams' inter-token latency does not
change, while any single request is being prepared (parsed, validated, templated, tokenized, its grammar
compiled). This script measures it against a real `ggufchat serve`.

Unless --url is given, it starts `ggufchat serve --host 127.0.0.1 --port 0` on the embedded model
(arguments after `--` go to serve, e.g. `-- -t 1 -np 4`), reads the bound port from its log and waits
for /health. Then it runs one phase per line below, one after the other; in each phase, at the same time:

    /health prober   GET /health every --probe-ms (20 ms) on one keep-alive connection of its own,
                     the latency of each answer
    streams          --streams (2) streaming chat completions (temperature 0, ignore_eos, --max-tokens
                     200, "speculative": false), restarted as they finish; the gap between consecutive
                     content chunks of a stream is one inter-token latency (ITL) sample
    heavy request    none in the baseline; else one kind below, sent again as soon as it is answered
                     until --phase-seconds have passed (always at least once), from a worker process:
                     this script's own GIL stays free for the prober and the stream readers

Why back to back and not once: most of these requests take 2 ms to 1 s, and once they would cover a
handful of probes and tokens, so a p99 would say nothing. Sent back to back, one at a time, exactly one
heavy request is always being prepared during the window, which is the situation the requirement names,
and the window holds hundreds of probes and tokens. The price: the cheapest kinds (a few ms each) become
hundreds of requests a second, so their rows show what request traffic as such costs the streams; they
are the yardstick the expensive kinds are read against. --once sends each heavy request a single time
(then the window is its duration). Only samples inside the window count: from the first heavy request
sent to the last one answered (baseline: --phase-seconds after the streams have started). A second
baseline runs last (baseline-end): on a shared machine, how far it drifts from the first is the noise
the other phases are to be read against.

    phase            request                                                          expected status
    baseline         none: /health and the streams alone                                         -
    messages-110k    /v1/chat/completions with 110,000 messages (over --max-messages)          400
    tokenize-3MB     /tokenize of 3 MiB of text with with_pieces                                200
    prompt-3.9MiB    /v1/completions with a 3.9 MiB text prompt (longer than the context)       400
    chat-3MiB        /v1/chat/completions with one 3 MiB message (longer than the context)      400
    enum-20000       response_format json_schema, an enum of 20,000 strings (grammar limits)    400
    maxLength-30000  response_format json_schema, a string of maxLength 30000 (grammar limits)  400
    echo-bad-id      /v1/completions {"prompt": [931099052], "echo": true} (outside the vocab)  400
    baseline-end     none, again                                                                 -

Every body is compact JSON under the server's default 4 MiB body limit.

Printed per phase: the heavy requests' count, statuses and durations; /health p50/p99/max and how many
probes took over 50 ms; ITL p50/p99/max and their ratio to the baseline's; from /metrics, llama_decode
milliseconds per engine step, as the server times the call (so the wait to take the GIL back after
llama_decode returns is in it: a step that gets slower means CPU taken from the decode thread, or a GIL
held by another thread of the server; a /health or ITL spike with steps as fast as in the baseline means
the event loop alone was held); the server's CPU use (when this script started it, or --server-pid);
this script's own CPU use and its prober's wake-up lateness (it shares the machine: a late wake-up is
the client's delay, not the server's).

The exit status is 1 when a heavy request got another status than expected (or no answer), a stream
failed (not 200, an error event, cut off), /health answered other than 200 or not at all, the server
died, its log has a traceback or ERROR line, it did not stop cleanly, or --health-limit-ms is given and a
phase's /health max exceeded it; 2 when the server could not start. Slow answers alone do not fail the
run: on a shared 2-core machine they are a measurement to read, not a verdict.

    python scripts/stall_probe.py [--phase-seconds 5] [--once] [--kinds a,b] [--streams 2] [--max-tokens 200]
        [--probe-ms 20] [--health-limit-ms MS] [--url URL [--server-pid PID]] [--json OUT] [-- SERVE_ARGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import TOPICS, percentile  # noqa: E402
from soak import (  # noqa: E402
    _ms,
    _sse,
    cpu_s,
    gauge,
    load1,
    log_problems,
    parse_metrics,
    read_all,
    read_head,
    split_serve_args,
    start_server,
    stop_line,
    stop_server,
    verdict_lines,
)

CHAT = "/v1/chat/completions"
MAX_BODY = 4 << 20  # the server's default --max-body
SLOW_MS = 50.0  # the requirement's bound for /health
FEW_GAPS = 30  # below this many ITL samples in a window, a p99 says little
COMPACT = (",", ":")


@dataclass
class Heavy:
    name: str
    path: str
    body: bytes
    expect: int
    what: str


def heavy_requests() -> list[Heavy]:
    """The heavy kinds, in the order they run. Built once, before any phase: building them is the
    client's work and must not fall inside a measured window."""
    hi = [{"role": "user", "content": "hi"}]
    words = ("lorem ipsum dolor sit amet " * 120_000)[: 3 << 20]  # 3 MiB of ordinary words

    def fmt(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    def body(obj: dict) -> bytes:
        return json.dumps(obj, separators=COMPACT).encode()

    kinds = [
        Heavy("messages-110k", CHAT,
              body({"messages": [{"role": "user", "content": "hi there"}] * 110_000, "max_tokens": 1}), 400,
              "110,000 chat messages"),
        Heavy("tokenize-3MB", "/tokenize", body({"content": words, "with_pieces": True}), 200,
              "/tokenize 3 MiB of text with pieces"),
        # 2,040,000 x "x ": 3.9 MiB of prompt text, ~2 million tokens, far over any context.
        Heavy("prompt-3.9MiB", "/v1/completions", body({"prompt": "x " * 2_040_000, "max_tokens": 1}), 400,
              "a 3.9 MiB completions prompt"),
        Heavy("chat-3MiB", CHAT, body({"messages": [{"role": "user", "content": words}], "max_tokens": 1}), 400,
              "one 3 MiB chat message"),
        Heavy("enum-20000", CHAT, body({"messages": hi, "max_tokens": 4,
                                        "response_format": fmt({"enum": [f"value-{i}" for i in range(20_000)]})}),
              400, "json_schema enum of 20,000 strings"),
        Heavy("maxLength-30000", CHAT, body({"messages": hi, "max_tokens": 4,
                                             "response_format": fmt({"type": "string", "maxLength": 30_000})}),
              400, "json_schema string maxLength 30000"),
        Heavy("echo-bad-id", "/v1/completions", body({"prompt": [931099052], "echo": True}), 400,
              "echo of a token id outside the vocabulary"),
    ]
    for k in kinds:
        # Over the limit the server would answer 413 without reading the body: a different, cheap path.
        if len(k.body) >= MAX_BODY:
            raise SystemExit(f"stall-probe: the {k.name} body is {len(k.body)} bytes, over the 4 MiB limit")
    return kinds


# --- HTTP -------------------------------------------------------------------------------------------


class Target:
    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported, not {url}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.url = f"http://{self.host}:{self.port}"
        self.api_key = api_key

    def head(self, method: str, path: str, body: bytes | None, *, keep_alive: bool = False) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if not keep_alive:
            lines.append("Connection: close")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        """A blocking GET (outside the measured windows: startup, /metrics, the liveness check)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@dataclass
class HeavyResult:
    status: int | None
    seconds: float
    t_start: float
    t_end: float
    response_bytes: int = 0
    message: str = ""  # the error message of a refusal, or why there was no answer


def hammer(target: Target, heavy: Heavy, until: float, once: bool, timeout: float) -> tuple[list[HeavyResult], float]:
    """The heavy requests of a phase, one at a time until time.monotonic() reaches `until` (the last one
    may end after it: the window waits for it). Runs in a worker process: sent back to back, the cheap
    kinds are ~1000 requests a second of Python in http.client, and in a thread of this process they would
    hold the GIL that the prober and the stream readers need (measured: the prober woke up 156 ms late).
    Returns the results and the worker's CPU seconds."""
    cpu0 = time.process_time()
    results: list[HeavyResult] = []
    while True:
        results.append(send_heavy(target, heavy, timeout))
        if once or time.monotonic() >= until or results[-1].status is None:
            return results, time.process_time() - cpu0


def send_heavy(target: Target, heavy: Heavy, timeout: float) -> HeavyResult:
    """One heavy request on a blocking socket (a /tokenize answer of tens of MB read and dropped)."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    t0 = time.perf_counter()
    try:
        conn.request("POST", heavy.path, body=heavy.body, headers=headers)
        resp = conn.getresponse()
        first = b""
        size = 0
        while piece := resp.read(1 << 20):
            if len(first) < 4096:
                first += piece[: 4096 - len(first)]
            size += len(piece)
        t1 = time.perf_counter()
        message = ""
        if resp.status != 200:
            try:
                message = str(json.loads(first)["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = first[:300].decode("utf-8", "replace")
        return HeavyResult(resp.status, t1 - t0, t0, t1, size, message)
    except (OSError, http.client.HTTPException) as e:
        t1 = time.perf_counter()
        return HeavyResult(None, t1 - t0, t0, t1, 0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


# --- the three workloads of a phase ----------------------------------------------------------------


@dataclass
class Probe:
    t_send: float
    latency: float | None  # None: no answer (connection error, timeout)
    status: int | None
    lateness: float  # how late the prober woke up for it: this process's delay, not the server's


async def health_prober(target: Target, interval: float, stop: asyncio.Event, probes: list[Probe]) -> None:
    """GET /health on a schedule (one every `interval`; at once when an answer came later than that), on
    one keep-alive connection, reconnecting after an error."""
    reader = writer = None
    request = target.head("GET", "/health", None, keep_alive=True)
    due = time.perf_counter()
    try:
        while not stop.is_set():
            now = time.perf_counter()
            lateness = 0.0
            if due > now:
                await asyncio.sleep(due - now)
                lateness = max(0.0, time.perf_counter() - due)
            due = max(due + interval, time.perf_counter())
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                    t0 = time.perf_counter()  # a reconnect is not the server's latency
                writer.write(request)
                status, headers = await asyncio.wait_for(read_head(reader), 10.0)
                await asyncio.wait_for(read_all(reader, headers), 10.0)
                probes.append(Probe(t0, time.perf_counter() - t0, status, lateness))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                probes.append(Probe(t0, None, None, lateness))
                print(f"stall-probe: /health failed: {type(e).__name__}: {e}", file=sys.stderr)
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(interval)
    finally:
        if writer is not None:
            writer.close()


@dataclass
class StreamLog:
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (end time, gap seconds)
    first_chunk: list[float] = field(default_factory=list)  # when each stream produced its first chunk
    started: int = 0
    completed: int = 0
    failures: list[str] = field(default_factory=list)


async def stream_client(target: Target, index: int, max_tokens: int, stop: asyncio.Event, log: StreamLog) -> None:
    """Streaming chat completions one after another until stopped; the one running then is abandoned."""
    # The same prompt per client in every phase, at temperature 0: each phase decodes the same tokens,
    # so the phases differ only by the heavy request. ignore_eos: every stream runs its full length. No
    # speculation: accepted drafts arrive several tokens to a step, and gaps of 0 ms between them would
    # hide the steady cadence whose stalls this measures.
    payload = {"messages": [{"role": "user", "content": f"Write a long story about {TOPICS[index % len(TOPICS)]}."}],
               "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
               "speculative": False}
    body = json.dumps(payload).encode()
    while not stop.is_set():
        log.started += 1
        stopped = asyncio.ensure_future(stop.wait())
        run = asyncio.ensure_future(_one_stream(target, body, log))
        try:
            done, _ = await asyncio.wait({stopped, run}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if run not in done:  # the phase is over: close this connection (the server cancels the sequence)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            return
        if why := run.result():
            log.failures.append(why)
            await asyncio.sleep(0.5)  # do not spin on a server that refuses
        else:
            log.completed += 1


async def _one_stream(target: Target, body: bytes, log: StreamLog) -> str | None:
    """One stream, its gaps recorded as they arrive; the reason it failed, or None."""
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
    except OSError as e:
        return f"stream: cannot connect: {e}"
    try:
        writer.write(target.head("POST", CHAT, body) + body)
        status, headers = await read_head(reader)
        if status != 200:
            text = (await read_all(reader, headers))[:200].decode("utf-8", "replace")
            return f"stream: HTTP {status}: {text}"
        last = None
        done = False
        async with contextlib.aclosing(_sse(reader, headers)) as events:
            async for data in events:
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("error"):
                    return f"stream: error event: {json.dumps(event['error'])[:200]}"
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    if last is None:
                        log.first_chunk.append(now)
                    else:
                        log.gaps.append((now, now - last))
                    last = now
        return None if done else "stream: ended without data: [DONE]"
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        return f"stream: {type(e).__name__}: {e}"
    finally:
        writer.close()


# --- one phase ---------------------------------------------------------------------------------------


def engine_sample(target: Target) -> dict:
    try:
        status, body = target.get("/metrics", 10.0)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    m = parse_metrics(body.decode("utf-8", "replace"))
    return {"steps": gauge(m, "ggufchat_engine_steps"), "decode_s": gauge(m, "ggufchat_engine_decode_seconds")}


async def run_phase(args, target: Target, name: str, heavy: Heavy | None, pid: int | None,
                    worker: ProcessPoolExecutor) -> dict:
    stop = asyncio.Event()
    probes: list[Probe] = []
    slog = StreamLog()
    loop = asyncio.get_running_loop()
    prober = asyncio.create_task(health_prober(target, args.probe_ms / 1000.0, stop, probes))
    streams = [asyncio.create_task(stream_client(target, i, args.max_tokens, stop, slog))
               for i in range(args.streams)]
    # The window opens once every stream is decoding: prefill and time-to-first-token are not ITL.
    deadline = time.perf_counter() + 60.0
    while len(slog.first_chunk) < args.streams and time.perf_counter() < deadline and not slog.failures:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # a few steps of steady decoding before the window opens
    before = await loop.run_in_executor(None, engine_sample, target)
    cpu0 = cpu_s(pid) if pid else None
    own0 = time.process_time()

    results: list[HeavyResult] = []
    worker_cpu = 0.0
    w0 = time.perf_counter()
    if heavy is None:
        await asyncio.sleep(args.phase_seconds)
    else:
        results, worker_cpu = await loop.run_in_executor(
            worker, hammer, target, heavy, time.monotonic() + args.phase_seconds, args.once, args.request_timeout)
    w1 = time.perf_counter()
    cpu1 = cpu_s(pid) if pid else None
    own1 = time.process_time()
    after = await loop.run_in_executor(None, engine_sample, target)
    stop.set()
    await asyncio.gather(prober, *streams)

    window = w1 - w0
    inside = [p for p in probes if w0 <= p.t_send <= w1]
    answered = [p.latency for p in inside if p.latency is not None]
    gaps = [g for t, g in slog.gaps if w0 <= t <= w1]
    phase: dict = {
        "phase": name, "window_s": round(window, 2),
        "health": {"n": len(inside), "p50_ms": _ms(percentile(answered, 50)), "p99_ms": _ms(percentile(answered, 99)),
                   "max_ms": _ms(max(answered, default=None)),
                   "over_50ms": sum(1 for x in answered if x * 1000 > SLOW_MS),
                   "errors": sum(1 for p in inside if p.latency is None or p.status != 200),
                   "probe_lateness_max_ms": _ms(max((p.lateness for p in inside), default=None)),
                   "latencies_ms": [round(x * 1000, 2) for x in answered]},
        "itl": {"n": len(gaps), "p50_ms": _ms(percentile(gaps, 50)), "p99_ms": _ms(percentile(gaps, 99)),
                "max_ms": _ms(max(gaps, default=None)), "gaps_ms": [round(x * 1000, 2) for x in gaps]},
        "streams": {"started": slog.started, "completed": slog.completed, "failures": slog.failures[:5],
                    "n_failures": len(slog.failures)},
        "load1": load1(),
        # This script's own CPU: on a 2-core machine it is taken from the server.
        "client_cpu_pct": round((own1 - own0 + worker_cpu) / window * 100) if window > 0 else None,
    }
    if heavy is not None:
        durations = [r.seconds for r in results]
        statuses = Counter(r.status for r in results)
        phase["heavy"] = {
            "path": heavy.path, "what": heavy.what, "bytes": len(heavy.body), "expect": heavy.expect,
            "n": len(results), "statuses": {str(k): v for k, v in statuses.items()},
            "p50_s": round(percentile(durations, 50), 3), "max_s": round(max(durations), 3),
            "response_bytes": results[0].response_bytes,
            "message": next((r.message for r in results if r.message), ""),
            "unexpected": [f"{r.status}: {r.message[:200]}" for r in results if r.status != heavy.expect][:3],
        }
    steps = (after.get("steps") or 0) - (before.get("steps") or 0)
    if after.get("steps") is not None and before.get("steps") is not None:
        phase["engine"] = {"steps": int(steps), "steps_per_s": round(steps / window, 1) if window > 0 else None,
                           "decode_ms_per_step": round((after["decode_s"] - before["decode_s"]) / steps * 1000, 2)
                           if steps > 0 and after.get("decode_s") is not None else None}
    if cpu0 is not None and cpu1 is not None and window > 0:
        phase["server_cpu_pct"] = round((cpu1 - cpu0) / window * 100)
    return phase


# --- the server ---------------------------------------------------------------------------------------


def healthy(target: Target, timeout: float = 5.0) -> bool:
    with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
        status, body = target.get("/health", timeout)
        return status == 200 and json.loads(body).get("status") == "ok"
    return False


# --- the report ---------------------------------------------------------------------------------------


def _f(x, fmt: str = "{:g}") -> str:
    return "-" if x is None else fmt.format(x)


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else round(x / base, 2)


def format_report(s: dict) -> str:
    base = s["phases"][0]["itl"] if s["phases"] and s["phases"][0]["phase"] == "baseline" else {}
    # Two header rows: the groups over their columns, then the columns (p50/p99/max read within a group).
    groups = [("", 2), ("heavy requests", 3), ("/health ms", 5), ("stream ITL ms", 6), ("server", 2),
              ("probe", 2)]
    head = ["phase", "expect", "n x status", "p50 s", "max s", "n", "p50", "p99", "max", ">50",
            "n", "p50", "p99", "max", "p50 x", "p99 x", "ms/step", "cpu %", "cpu %", "late"]
    rows = [head]
    for p in s["phases"]:
        h, i, e = p["health"], p["itl"], p.get("engine") or {}
        hv = p.get("heavy")
        statuses = ", ".join(f"{n} x {st}" for st, n in hv["statuses"].items()) if hv else "-"
        rows.append([p["phase"], str(hv["expect"]) if hv else "-", statuses,
                     _f(hv and hv["p50_s"], "{:.2f}"), _f(hv and hv["max_s"], "{:.2f}"),
                     str(h["n"]), _f(h["p50_ms"]), _f(h["p99_ms"]), _f(h["max_ms"]), str(h["over_50ms"]),
                     str(i["n"]), _f(i["p50_ms"]), _f(i["p99_ms"]), _f(i["max_ms"]),
                     _f(_ratio(i["p50_ms"], base.get("p50_ms")), "{:.2f}"),
                     _f(_ratio(i["p99_ms"], base.get("p99_ms")), "{:.2f}"),
                     _f(e.get("decode_ms_per_step")), _f(p.get("server_cpu_pct")), _f(p.get("client_cpu_pct")),
                     _f(h["probe_lateness_max_ms"])])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    sep = "  "
    top, col = [], 0
    for label, span in groups:
        width = sum(widths[col:col + span]) + len(sep) * (span - 1)
        top.append(label.center(width, "-" if label else " "))
        col += span
    out = [s["title"], sep.join(top).rstrip()]
    out += [sep.join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
    out.append("heavy p50/max s: each heavy request's time to its whole answer; >50: /health answers over 50 ms; "
               "ITL: the gap between a stream's content chunks; p50 x / p99 x: over the baseline's; ms/step: "
               "ms per engine step in the llama_decode call, the wait to take the GIL back after it included; "
               "cpu %: the server's and this script's CPU over the window (200 = 2 cores); "
               "late: the prober's own worst wake-up delay, ms")
    for p in s["phases"]:
        hv = p.get("heavy")
        if hv and hv["message"]:
            out.append(f"  {p['phase']}: {hv['what']}, {hv['bytes'] / (1 << 20):.2f} MiB -> "
                       f"{hv['message'][:110]}")
        elif hv:
            out.append(f"  {p['phase']}: {hv['what']}, {hv['bytes'] / (1 << 20):.2f} MiB -> "
                       f"{hv['response_bytes'] / (1 << 20):.1f} MiB answer")
    slow = [p["phase"] for p in s["phases"] if (p["health"]["max_ms"] or 0) > SLOW_MS]
    out.append(f"/health max over {SLOW_MS:g} ms: " + (", ".join(slow) if slow else "none"))
    if base.get("p99_ms"):
        worse = [f"{p['phase']} ({_ratio(p['itl']['p99_ms'], base['p99_ms'])}x)" for p in s["phases"][1:]
                 if (_ratio(p["itl"]["p99_ms"], base["p99_ms"]) or 0) >= 1.5]
        out.append("ITL p99 >= 1.5x the baseline's: " + (", ".join(worse) if worse else "none"))
    few = [p["phase"] for p in s["phases"] if p["itl"]["n"] < FEW_GAPS]
    if few:
        # e.g. -t 2 on a loaded 2-core machine: llama.cpp's spinning thread team made steps take seconds.
        out.append(f"fewer than {FEW_GAPS} ITL gaps (the p99 is then about the max; ratios are noise): "
                   + ", ".join(few))
    if s.get("stop"):
        out.append(stop_line(s["stop"]))
    out += verdict_lines(s["reasons"])
    return "\n".join(out)


def phase_problems(p: dict, limit_ms: float | None) -> list[str]:
    reasons = []
    hv = p.get("heavy")
    if hv and hv["unexpected"]:
        reasons.append(f"{p['phase']}: expected HTTP {hv['expect']}, got {hv['unexpected'][0]}")
    if p["health"]["errors"]:
        reasons.append(f"{p['phase']}: {p['health']['errors']} /health probes not answered 200")
    if p["streams"]["n_failures"]:
        reasons.append(f"{p['phase']}: {p['streams']['n_failures']} streams failed, first: "
                       f"{p['streams']['failures'][0]}")
    if not p["health"]["n"] or not p["itl"]["n"]:
        reasons.append(f"{p['phase']}: no /health probe or no stream token inside the window")
    if limit_ms is not None and (p["health"]["max_ms"] or 0) > limit_ms:
        reasons.append(f"{p['phase']}: /health max {p['health']['max_ms']} ms > --health-limit-ms {limit_ms:g}")
    return reasons


async def probe_all(args, target: Target, kinds: list[Heavy], proc: subprocess.Popen | None,
                    pid: int | None) -> tuple[list[dict], list[str]]:
    phases: list[dict] = []
    reasons: list[str] = []
    # spawn, not fork: this process has threads (the event loop's executor) by now.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as worker:
        # Start the worker now: its start-up (a Python interpreter importing this script) is CPU that
        # must not fall inside the first measured window.
        await asyncio.get_running_loop().run_in_executor(worker, time.monotonic)
        for name, heavy in [("baseline", None), *((k.name, k) for k in kinds), ("baseline-end", None)]:
            if not await phase_ok(args, target, name, heavy, proc, pid, worker, phases, reasons):
                break
    return phases, reasons


async def phase_ok(args, target: Target, name: str, heavy: Heavy | None, proc: subprocess.Popen | None,
                   pid: int | None, worker: ProcessPoolExecutor, phases: list[dict], reasons: list[str]) -> bool:
    """Run one phase and record it; False when the server is gone and no phase can follow."""
    print(f"stall-probe: phase {name}", file=sys.stderr)
    p = await run_phase(args, target, name, heavy, pid, worker)
    phases.append(p)
    reasons += phase_problems(p, args.health_limit_ms)
    alive = await asyncio.get_running_loop().run_in_executor(None, healthy, target, 10.0)
    if (proc is not None and proc.poll() is not None) or not alive:
        code = proc.poll() if proc is not None else None
        reasons.append(f"the server died or stopped answering /health during phase {name}"
                       + (f" (exit status {code})" if code is not None else ""))
        return False
    await asyncio.sleep(0.3)  # the abandoned streams' sequences end before the next phase
    return True


def main(argv: list[str] | None = None) -> int:
    argv, serve_args = split_serve_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Arguments after -- go to `ggufchat serve` (e.g. -- -t 1 -np 4).")
    ap.add_argument("--phase-seconds", type=float, default=5.0,
                    help="how long the heavy request is repeated in each phase (default 5)")
    ap.add_argument("--once", action="store_true", help="send each heavy request once, not back to back")
    ap.add_argument("--kinds", default=None, help="comma-separated heavy kinds, run in that order (default: all)")
    ap.add_argument("--streams", type=int, default=2, help="concurrent streaming chat completions (default 2)")
    ap.add_argument("--max-tokens", type=int, default=200, help="max_tokens of each stream (default 200)")
    ap.add_argument("--probe-ms", type=float, default=20.0, help="/health every this many ms (default 20)")
    ap.add_argument("--health-limit-ms", type=float, default=None,
                    help="also fail when a phase's /health max exceeds this (default: report only)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds per heavy request")
    ap.add_argument("--url", default=None, help="probe this server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: report this process's CPU use")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--log-dir", default=None, help="server log folder (default artifacts/stall_probe/<time>)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.phase_seconds <= 0 or args.streams < 1 or args.max_tokens < 2 or args.probe_ms <= 0:
        ap.error("--phase-seconds and --probe-ms > 0, --streams >= 1, --max-tokens >= 2")
    if args.url and serve_args:
        ap.error("arguments for serve after -- make no sense with --url")

    kinds = heavy_requests()
    if args.kinds:
        wanted = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {k.name for k in kinds})
        if unknown:
            ap.error(f"unknown --kinds {unknown}; known: {', '.join(k.name for k in kinds)}")
        by_name = {k.name: k for k in kinds}
        kinds = [by_name[w] for w in dict.fromkeys(wanted)]  # in the order given

    proc = None
    log_path = None
    pid = args.server_pid
    if args.url:
        url = args.url
    else:
        log_dir = Path(args.log_dir) if args.log_dir else \
            ROOT / "artifacts" / "stall_probe" / time.strftime("%Y%m%d-%H%M%S")
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "server.log"
        try:
            proc, url = start_server(serve_args, log_path, args.startup_timeout, name="stall-probe")
        except RuntimeError as e:
            print(f"stall-probe: {e}", file=sys.stderr)
            return 2
        pid = proc.pid
    target = Target(url, args.api_key)
    mode = "once each" if args.once else f"back to back for {args.phase_seconds:g} s"
    title = (f"stall probe of {url}" + (f" (serve {' '.join(serve_args)})" if serve_args else "")
             + f": heavy requests {mode}; {args.streams} streams (max_tokens {args.max_tokens}, temperature 0); "
             f"/health every {args.probe_ms:g} ms")
    print(f"stall-probe: {title}", file=sys.stderr)
    try:
        phases, reasons = asyncio.run(probe_all(args, target, kinds, proc, pid))
    except BaseException:
        if proc is not None:
            stop_server(proc)
        raise
    summary: dict = {"title": title, "url": url, "serve_args": serve_args, "phase_seconds": args.phase_seconds,
                     "once": args.once, "streams": args.streams, "max_tokens": args.max_tokens,
                     "probe_ms": args.probe_ms, "phases": phases, "reasons": reasons}
    if proc is not None:
        stop = stop_server(proc)
        summary["stop"] = stop
        # uvicorn re-raises SIGTERM after its graceful shutdown: -SIGTERM is a normal stop.
        if stop["killed"] or stop["exit_code"] not in (0, -signal.SIGTERM):
            reasons.append(f"the server did not stop cleanly on SIGTERM: {stop}")
        summary["log"] = str(log_path)
        problems = log_problems(log_path)
        if problems:
            reasons.append(f"the server log has {len(problems)} traceback/ERROR lines, first: {problems[0]}")
    print(format_report(summary))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
