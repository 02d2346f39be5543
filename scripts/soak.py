#!/usr/bin/env python3
"""Soak test: N clients for M minutes against a real `ggufchat serve`, with random disconnects.

Unless --url is given, the script starts `ggufchat serve --host 127.0.0.1 --port 0` on the embedded
model (arguments after `--` go to serve, e.g. `-- -np 8 -c 8192`), reads the bound port from its log and
waits for /health. Each client then sends requests back to back until the time is up, drawn at random:

    chat_stream        /v1/chat/completions, stream, sometimes n=2 or a continued conversation
    chat               /v1/chat/completions, one JSON body, sometimes n=2
    completion_stream  /v1/completions, stream
    completion         /v1/completions, one JSON body
    bad                a request the server must refuse with a 4xx JSON error: a prompt longer than the
                       context, temperature out of range, a token id outside the vocabulary, top_logprobs over 20

A fraction of the good requests (--disconnect-fraction) is abandoned on purpose: a stream after a random
number of content chunks (sometimes 0: right after sending), a JSON request after a random delay; the
socket is closed with a FIN or a RST. Every few seconds the server's RSS (/proc/PID/status, when this
script started the server or was given --server-pid) and /metrics are sampled.

When the time is up the clients finish the requests in flight, the server gets --settle-s to drain, and a
summary table is printed (requests by kind and outcome, tokens, aggregate t/s, TTFT, RSS, the gauges at
the end; to read the speed by, the engine's steps and llama_decode time per step, the server's CPU time
and the machine's load average). The exit status is 1 on any of: a 5xx; a connection error or a
dropped response on a request that was not abandoned on purpose; a malformed response (error event, no
[DONE], no finish_reason, a token count that ignore_eos does not explain); a bad request not refused
with a 4xx JSON error; ggufchat_active_sequences or ggufchat_queue_depth above 0 after settling; /health
not 200 within --health-timeout; RSS growth after the warm-up above --rss-growth-mib; a traceback or
ERROR line in the server log; a server that does not stop on SIGTERM. 2 when the server cannot start.

    python scripts/soak.py [--clients 8] [--minutes 10] [--disconnect-fraction 0.3] [--bad-fraction 0.08]
        [--rss-growth-mib 64] [--max-tokens 96] [--seed 0] [--url URL [--server-pid PID]] [--json OUT]
        [-- SERVE_ARGS...]

The HTTP client is plain asyncio streams (no dependency), one connection per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import TOPICS, _read_body, percentile  # noqa: E402

KINDS = ["chat_stream", "chat", "completion_stream", "completion", "bad"]
GOOD_WEIGHTS = {"chat_stream": 4, "chat": 2, "completion_stream": 2, "completion": 1}
BAD_CASES = ["too_long_chat", "too_long_completion_stream", "bad_temperature", "bad_token_id", "top_logprobs"]
# Failures that fail the run, by the name the summary uses for them.
FAILURES = {
    "5xx": "5xx responses",
    "http": "unexpected HTTP status on a valid request",
    "connection": "connection errors before a response",
    "dropped": "responses cut off by the server (not abandoned by the client)",
    "protocol": "malformed responses",
    "not_refused": "bad requests not refused with a 4xx JSON error",
    "timeout": "requests past --request-timeout",
}
MIB = 1024 * 1024


class Abandoned(Exception):
    """The client closed the connection on purpose."""


# --- the requests ------------------------------------------------------------------------------------


@dataclass
class Plan:
    kind: str
    path: str
    payload: dict
    bad_case: str | None = None
    abort_after_chunks: int | None = None  # streams: close after this many content chunks (0: once sent)
    abort_after_s: float | None = None  # JSON requests: close if no answer by then; also the delay for 0
    abort_style: str = "close"  # "close": FIN; "reset": RST (SO_LINGER 0), as a killed client does
    expect_length: int | None = None  # ignore_eos without stop: exactly n * max_tokens tokens

    @property
    def stream(self) -> bool:
        return bool(self.payload.get("stream"))


@dataclass
class Result:
    kind: str
    outcome: str = "ok"  # ok | abandoned | refused (a bad request answered with a 4xx) | failed
    failure: str | None = None  # a key of FAILURES
    detail: str = ""
    status: int | None = None
    tokens: int = 0
    ttft_s: float | None = None
    start: float = 0.0
    end: float = 0.0
    bad_case: str | None = None
    abandoned_after: int | None = None
    text: str = field(default="", repr=False)  # the first choice's reply, for a continued conversation

    def fail(self, failure: str, detail: str) -> None:
        self.outcome, self.failure, self.detail = "failed", failure, detail[:400]


class Target:
    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported, not {url}")
        self.url = f"http://{parts.hostname}:{parts.port or 80}"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.api_key = api_key
        self.n_ctx_seq = 32768  # replaced by /v1/models' n_ctx_per_sequence when the server reports it
        self.model = "soak"  # replaced by /v1/models' first id: a server with several models checks names
        self.n_vocab_hint = 10**7  # a token id no vocabulary reaches

    def head(self, method: str, path: str, body: bytes | None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Connection: close"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without a response")
    status = int(status_line.decode("latin-1").split(" ", 2)[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_all(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    return b"".join([piece async for piece in _read_body(reader, headers)])


async def http_get(target: Target, path: str, timeout: float) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(target.head("GET", path, None))
            await writer.drain()
            status, headers = await read_head(reader)
            return status, await read_all(reader, headers)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


def abandon(writer: asyncio.StreamWriter, style: str) -> None:
    if style == "reset":
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


def _json_error(status: int, headers: dict[str, str], body: bytes) -> str | None:
    """Why this is not an OpenAI-style JSON error body, or None when it is one."""
    if "application/json" not in headers.get("content-type", ""):
        return f"content-type {headers.get('content-type')!r}, not JSON"
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return "the body is not a JSON object"
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return 'no {"error": {"message": ...}} in the body'
    return None


async def _sse(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the data of each server-sent event as it arrives."""
    buf = b""
    data: list[str] = []
    async for piece in _read_body(reader, headers):
        buf += piece
        while (nl := buf.find(b"\n")) >= 0:
            line = buf[:nl].rstrip(b"\r").decode("utf-8", "replace")
            buf = buf[nl + 1:]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
    if data:
        yield "\n".join(data)


def _delta_text(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def _exchange(target: Target, plan: Plan, res: Result) -> None:
    body = json.dumps(plan.payload).encode()
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
    try:
        writer.write(target.head("POST", plan.path, body) + body)
        await writer.drain()
        if plan.abort_after_chunks == 0:
            # Gone before the answer: the request may still be queued for a slot, or in its prefill.
            await asyncio.sleep(plan.abort_after_s or 0.0)
            res.abandoned_after = 0
            abandon(writer, plan.abort_style)
            raise Abandoned
        if plan.abort_after_s is not None and not plan.stream:
            try:
                await asyncio.wait_for(_answer(reader, plan, res), plan.abort_after_s)
            except (TimeoutError, asyncio.TimeoutError):
                abandon(writer, plan.abort_style)
                raise Abandoned from None
        else:
            await _answer(reader, plan, res, writer)
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader, plan: Plan, res: Result,
                  writer: asyncio.StreamWriter | None = None) -> None:
    status, headers = await read_head(reader)
    res.status = status
    chat = "chat" in plan.path
    if plan.kind == "bad":
        payload = await read_all(reader, headers)
        if status >= 500:
            res.fail("5xx", f"{plan.bad_case}: HTTP {status}: {payload[:200].decode('utf-8', 'replace')}")
        elif not 400 <= status < 500 or status == 429:
            res.fail("not_refused", f"{plan.bad_case}: HTTP {status}, expected a 4xx")
        elif why := _json_error(status, headers, payload):
            res.fail("not_refused", f"{plan.bad_case}: HTTP {status} but {why}")
        else:
            res.outcome = "refused"
        return
    if status != 200:
        payload = await read_all(reader, headers)
        text = payload[:200].decode("utf-8", "replace")
        res.fail("5xx" if status >= 500 else "http", f"{plan.path}: HTTP {status}: {text}")
        return
    n = plan.payload.get("n", 1)
    finishes: dict[int, str] = {}
    if not plan.stream:
        try:
            answer = json.loads(await read_all(reader, headers))
            choices = answer["choices"]
            res.tokens = int(answer["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            res.fail("protocol", f"{plan.path}: not a completion body ({type(e).__name__}: {e})")
            return
        for c in choices:
            finishes[c.get("index", 0)] = c.get("finish_reason")
        first = choices[0] if choices else {}
        res.text = ((first.get("message") or {}).get("content") or "") if chat else (first.get("text") or "")
    else:
        if "text/event-stream" not in headers.get("content-type", ""):
            res.fail("protocol", f"{plan.path}: content-type {headers.get('content-type')!r} for a stream")
            return
        chunks, done, usage = 0, False, None
        texts: list[str] = []
        async with contextlib.aclosing(_sse(reader, headers)) as events:
            async for data in events:
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    res.fail("protocol", f"{plan.path}: an event that is not JSON: {data[:120]!r}")
                    return
                if event.get("error"):
                    res.fail("protocol", f"{plan.path}: error event mid-stream: {json.dumps(event['error'])[:300]}")
                    return
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"].get("completion_tokens")
                for c in event.get("choices") or []:
                    if c.get("finish_reason"):
                        finishes[c.get("index", 0)] = c["finish_reason"]
                    if text := _delta_text(c, chat):
                        chunks += 1
                        if c.get("index", 0) == 0:
                            texts.append(text)
                        if res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - res.start
                res.tokens = chunks  # until the usage chunk says exactly
                if plan.abort_after_chunks is not None and chunks >= plan.abort_after_chunks and writer is not None:
                    res.abandoned_after = chunks
                    abandon(writer, plan.abort_style)
                    raise Abandoned
        res.text = "".join(texts)
        if not done:
            # The chunked body ended cleanly but without the terminator: the server gave up on the stream.
            res.fail("dropped", f"{plan.path}: the stream ended without data: [DONE] after {chunks} chunks")
            return
        if usage is None:
            res.fail("protocol", f"{plan.path}: no usage chunk although stream_options.include_usage was sent")
            return
        res.tokens = int(usage)
    if sorted(finishes) != list(range(n)) or not all(finishes.values()):
        res.fail("protocol", f"{plan.path}: finish_reason for choices {sorted(finishes)} of n={n}")
    elif plan.expect_length is not None and (res.tokens != plan.expect_length
                                             or set(finishes.values()) != {"length"}):
        res.fail("protocol", f"{plan.path}: ignore_eos with max_tokens {plan.payload['max_tokens']} x n={n} gave "
                 f"{res.tokens} tokens, finish_reason {sorted(set(finishes.values()))}")


async def execute(target: Target, plan: Plan, timeout: float) -> Result:
    res = Result(kind=plan.kind, bad_case=plan.bad_case, start=time.perf_counter())
    try:
        await asyncio.wait_for(_exchange(target, plan, res), timeout)
    except Abandoned:
        res.outcome = "abandoned"
    except (TimeoutError, asyncio.TimeoutError):
        res.fail("timeout", f"{plan.path}: no complete answer after {timeout:g} s")
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        # Before the status line: the server refused or reset the connection; after it: it cut the answer.
        where = "connection" if res.status is None else "dropped"
        res.fail(where, f"{plan.path}: {type(e).__name__}: {e}")
    res.end = time.perf_counter()
    return res


# --- what each client sends --------------------------------------------------------------------------


class Client:
    """One client's random but reproducible (per --seed) sequence of requests, and its conversation."""

    def __init__(self, index: int, target: Target, rng: random.Random, disconnect: float, bad: float,
                 max_tokens: int = 96):
        self.index = index
        self.max_tokens = max_tokens
        self.target = target
        self.rng = rng
        self.disconnect = disconnect
        self.bad = bad
        self.messages: list[dict] = []
        self.count = 0

    def _prompt(self) -> str:
        r = self.rng
        self.count += 1
        topic = r.choice(TOPICS)
        # Distinct prompts, so prefix reuse comes from continued conversations, not from chance repeats.
        return r.choice([f"Tell me about {topic}.", f"Write a short story about {topic}.",
                         f"List three facts about {topic}.", f"Describe {topic} in a few sentences."]) + \
            f" (client {self.index}, request {self.count})"

    def _sampling(self, p: dict, plan_kw: dict) -> None:
        r = self.rng
        p["max_tokens"] = r.randint(min(4, self.max_tokens), self.max_tokens)
        p["temperature"] = r.choice([0, 0, 0.7, 1.0])
        if r.random() < 0.3:
            p["top_p"] = 0.9
        if r.random() < 0.3:
            p["seed"] = r.randint(0, 1 << 30)
        if r.random() < 0.5:
            p["ignore_eos"] = True
            plan_kw["expect_length"] = p["max_tokens"] * p.get("n", 1)
        elif r.random() < 0.3:
            p["stop"] = ["\n\n", "."]

    def plan(self) -> Plan:
        r = self.rng
        if r.random() < self.bad:
            return self._bad_plan()
        kind = r.choices(list(GOOD_WEIGHTS), weights=list(GOOD_WEIGHTS.values()))[0]
        p: dict = {"model": self.target.model, "stream": kind.endswith("_stream")}
        kw: dict = {}
        if kind.startswith("chat"):
            path = "/v1/chat/completions"
            if self.messages and len(self.messages) < 8 and r.random() < 0.5:
                self.messages.append({"role": "user", "content": self._prompt()})  # continue: reuse the KV
            else:
                self.messages = [{"role": "user", "content": self._prompt()}]
                if r.random() < 0.3:
                    self.messages.insert(0, {"role": "system", "content": "You are a terse assistant."})
            p["messages"] = list(self.messages)
            if r.random() < 0.15:
                p["n"] = 2
        else:
            path = "/v1/completions"
            p["prompt"] = self._prompt() + "\n"
        if p["stream"]:
            p["stream_options"] = {"include_usage": True}
        self._sampling(p, kw)
        if r.random() < self.disconnect:
            kw["abort_style"] = r.choice(["close", "reset"])
            if p["stream"] and r.random() < 0.8:
                kw["abort_after_chunks"] = r.randint(1, max(1, p["max_tokens"] - 1))
            elif p["stream"]:
                kw["abort_after_chunks"], kw["abort_after_s"] = 0, r.uniform(0, 0.3)
            else:
                kw["abort_after_s"] = r.uniform(0.05, 1.5)
        return Plan(kind, path, p, **kw)

    def _bad_plan(self) -> Plan:
        r = self.rng
        case = r.choice(BAD_CASES)
        chat = {"messages": [{"role": "user", "content": self._prompt()}], "max_tokens": 8}
        if case == "too_long_chat":
            words = " ".join(r.choice(["apple", "river", "stone", "cloud"]) for _ in range(self.target.n_ctx_seq + 64))
            return Plan("bad", "/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                                       "max_tokens": 8}, bad_case=case)
        if case == "too_long_completion_stream":
            # Token ids need no tokenizing: cheap for a 2-core machine, and the check is the same.
            ids = [r.randint(100, 1000) for _ in range(self.target.n_ctx_seq + 16)]
            return Plan("bad", "/v1/completions", {"prompt": ids, "max_tokens": 8, "stream": True}, bad_case=case)
        if case == "bad_temperature":
            return Plan("bad", "/v1/chat/completions", {**chat, "temperature": 9.5}, bad_case=case)
        if case == "bad_token_id":
            return Plan("bad", "/v1/completions", {"prompt": [1, self.target.n_vocab_hint], "max_tokens": 8},
                        bad_case=case)
        return Plan("bad", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21,
                                                   "stream": r.random() < 0.5}, bad_case=case)

    def after(self, plan: Plan, res: Result) -> None:
        """Keep the conversation going only with a reply the server finished."""
        if plan.kind.startswith("chat") and res.outcome == "ok" and res.text:
            self.messages.append({"role": "assistant", "content": res.text})
        elif plan.kind.startswith("chat"):
            self.messages = []


# --- the server: start, sample, stop ------------------------------------------------------------------


def ggufchat_command() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "ggufchat"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ggufchat")
    return [found] if found else [sys.executable, "-m", "ggufchat"]


def start_server(serve_args: list[str], log_path: Path, timeout: float, *,
                 name: str = "soak") -> tuple[subprocess.Popen, str]:
    """A real `ggufchat serve` on a port the kernel picks; returns once /health says ok."""
    cmd = [*ggufchat_command(), "serve", "--host", "127.0.0.1", "--port", "0", *serve_args]
    print(f"{name}: starting {' '.join(cmd)} (log: {log_path})", file=sys.stderr)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    # --port 0: the kernel picks the port (no race with another process for a "free" one); serve logs it.
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log_tail(log_path)}")
        if url is None:
            m = re.search(r"(http://[^\s/]+:\d+)", log_path.read_text(errors="replace"))  # the "serving" line
            url = m.group(1) if m else None
        if url is not None:
            with contextlib.suppress(OSError, ValueError, asyncio.TimeoutError, TimeoutError):
                status, body = asyncio.run(http_get(Target(url, None), "/health", 2.0))
                if status == 200 and json.loads(body).get("status") == "ok":
                    return proc, url
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"the server was not ready after {timeout:g} s:\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM the server's group and time the graceful shutdown; SIGKILL if it hangs."""
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
        killed = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=10)
        killed = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
    return {"exit_code": code, "stop_s": round(time.monotonic() - t0, 2), "killed": killed}


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join("    | " + x for x in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_problems(path: Path) -> list[str]:
    """The server log's tracebacks and ERROR/CRITICAL lines (its format: 'LEVEL logger: message')."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [x for x in lines if x.startswith(("Traceback", "ERROR", "CRITICAL"))]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """The process's user + system CPU seconds (/proc/PID/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def load1() -> float | None:
    """The machine's 1-minute load average: on a shared machine, what the throughput is to be read against."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> {name: {labels: value}} (labels as written, '' when none)."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def gauge(metrics: dict, name: str) -> float | None:
    values = metrics.get(name)
    return sum(values.values()) if values else None


def by_label(metrics: dict, name: str, label: str) -> dict[str, float]:
    out: Counter = Counter()
    for labels, value in (metrics.get(name) or {}).items():
        m = re.search(label + r'="([^"]*)"', labels)
        out[m.group(1) if m else ""] += value
    return dict(out)


class Sampler:
    """RSS and /metrics every `interval` seconds, in the clients' event loop."""

    def __init__(self, target: Target, pid: int | None, interval: float):
        self.target, self.pid, self.interval = target, pid, interval
        self.samples: list[dict] = []
        self.scrape_errors: list[str] = []
        self.t0 = time.monotonic()

    async def sample(self) -> dict:
        s: dict = {"t": round(time.monotonic() - self.t0, 2), "load1": load1()}
        if self.pid is not None:
            s["rss_kib"] = rss_kib(self.pid)
            s["cpu_s"] = cpu_s(self.pid)
        t = time.perf_counter()
        try:
            status, body = await http_get(self.target, "/metrics", 10.0)
            s["scrape_ms"] = round((time.perf_counter() - t) * 1000, 1)
            if status == 200:
                m = parse_metrics(body.decode("utf-8", "replace"))
                s["active"] = gauge(m, "ggufchat_active_sequences")
                s["queue"] = gauge(m, "ggufchat_queue_depth")
                # Engine progress between samples: steps that stop while sequences are active is a stall;
                # decode seconds per step that balloon is a CPU shared with something else.
                s["steps"] = gauge(m, "ggufchat_engine_steps")
                s["decode_s"] = gauge(m, "ggufchat_engine_decode_seconds")
                s["metrics"] = m
            else:
                self.scrape_errors.append(f"/metrics: HTTP {status}")
        except (OSError, ValueError, asyncio.TimeoutError, TimeoutError) as e:
            self.scrape_errors.append(f"/metrics: {type(e).__name__}: {e}")
        self.samples.append(s)
        return s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)


# --- the run -----------------------------------------------------------------------------------------


async def discover(target: Target) -> None:
    """The model to name (the first listed: a server with several lists its default first) and its context
    length per sequence (for the too-long prompt) from /v1/models, when the server says them."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError, asyncio.TimeoutError,
                             TimeoutError):
        status, body = await http_get(target, "/v1/models", 10.0)
        if status == 200:
            card = json.loads(body)["data"][0]
            target.model = str(card.get("id") or target.model)
            if card.get("n_ctx_per_sequence"):
                target.n_ctx_seq = int(card["n_ctx_per_sequence"])


async def soak(args, target: Target, pid: int | None) -> dict:
    await discover(target)
    sampler = Sampler(target, pid, args.sample_s)
    await sampler.sample()  # the start: model loaded, nothing served yet
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop_sampling))
    duration = args.minutes * 60.0
    t_start = time.perf_counter()
    deadline = time.monotonic() + duration
    results: list[Result] = []

    async def run_client(i: int) -> None:
        client = Client(i, target, random.Random(f"{args.seed}-{i}"), args.disconnect_fraction, args.bad_fraction,
                        args.max_tokens)
        while time.monotonic() < deadline:
            plan = client.plan()
            res = await execute(target, plan, args.request_timeout)
            results.append(res)
            client.after(plan, res)
            if res.failure and args.verbose:
                print(f"soak: client {i}: {res.failure}: {res.detail}", file=sys.stderr)

    async def progress() -> None:
        while True:
            await asyncio.sleep(30)
            done = Counter(r.outcome for r in results)
            last = sampler.samples[-1] if sampler.samples else {}
            rss = f", RSS {last['rss_kib'] / 1024:.0f} MiB" if last.get("rss_kib") else ""
            print(f"soak: {time.monotonic() - sampler.t0:.0f} s: {len(results)} requests {dict(done)}{rss}",
                  file=sys.stderr)

    ticker = asyncio.create_task(progress())
    await asyncio.gather(*(run_client(i) for i in range(args.clients)))
    t_clients_done = time.perf_counter()
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker

    # Settle: the abandoned sequences are cancelled at the engine's next step; give it time, then judge.
    t_settle = time.monotonic()
    drained_s = None
    while time.monotonic() - t_settle < args.settle_s:
        s = await sampler.sample()
        if s.get("active") == 0 and s.get("queue") == 0 and drained_s is None:
            drained_s = round(time.monotonic() - t_settle, 2)
        if drained_s is not None and time.monotonic() - t_settle >= min(2.0, args.settle_s):
            break  # drained, and the allocator had a moment before the last RSS sample
        await asyncio.sleep(0.5)
    stop_sampling.set()
    await sampling
    final = await sampler.sample()

    t = time.perf_counter()
    try:
        h_status, h_body = await http_get(target, "/health", args.health_timeout)
        health = {"status": h_status, "ms": round((time.perf_counter() - t) * 1000, 1),
                  "body": h_body[:200].decode("utf-8", "replace")}
    except (OSError, ValueError, asyncio.TimeoutError, TimeoutError) as e:
        health = {"status": None, "ms": None, "body": f"{type(e).__name__}: {e}"}

    return summarize(args, results, sampler, final, health, drained_s, t_start, t_clients_done, duration)


def engine_progress(samples: list[dict]) -> dict:
    """Steps, decode time and server CPU over the run, the machine's load, and the longest time the engine
    made no step while sequences were active (a stall, as opposed to a slow but moving engine)."""
    with_steps = [s for s in samples if s.get("steps") is not None]
    out: dict = {"load1_max": max((s["load1"] for s in samples if s.get("load1") is not None), default=None)}
    cpu = [s["cpu_s"] for s in samples if s.get("cpu_s") is not None]
    out["server_cpu_s"] = round(cpu[-1] - cpu[0], 1) if len(cpu) >= 2 else None
    if len(with_steps) >= 2:
        a, b = with_steps[0], with_steps[-1]
        steps = b["steps"] - a["steps"]
        out["engine_steps"] = int(steps)
        if b.get("decode_s") is not None and a.get("decode_s") is not None and steps > 0:
            out["decode_ms_per_step"] = round((b["decode_s"] - a["decode_s"]) / steps * 1000, 2)
        stall, longest = 0.0, 0.0
        for prev, cur in zip(with_steps, with_steps[1:], strict=False):
            if prev.get("active") and cur.get("active") and cur["steps"] == prev["steps"]:
                stall += cur["t"] - prev["t"]
                longest = max(longest, stall)
            else:
                stall = 0.0
        out["longest_stall_s"] = round(longest, 1)
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 1)


def summarize(args, results: list[Result], sampler: Sampler, final: dict, health: dict, drained_s,
              t_start: float, t_clients_done: float, duration: float) -> dict:
    table = {k: Counter() for k in KINDS}
    for r in results:
        table[r.kind][r.outcome] += 1
    failures = [r for r in results if r.outcome == "failed"]
    tokens = sum(r.tokens for r in results if r.outcome in ("ok", "abandoned"))
    wall = (max((r.end for r in results), default=t_clients_done)) - t_start
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]

    rss = [(s["t"], s["rss_kib"]) for s in sampler.samples if s.get("rss_kib")]
    warm_t = min(args.warmup_s if args.warmup_s is not None else max(5.0, min(60.0, duration * 0.25)),
                 duration)
    rss_info: dict = {"sampled": bool(rss)}
    if rss:
        after_warm = [kib for t, kib in rss if t >= warm_t] or [rss[-1][1]]
        post = [(t, kib) for t, kib in rss if t >= warm_t]
        slope = None
        if len(post) >= 3 and post[-1][0] > post[0][0]:
            # least squares, MiB per minute: growth that keeps going, not one step up
            mt = sum(t for t, _ in post) / len(post)
            mk = sum(k for _, k in post) / len(post)
            var = sum((t - mt) ** 2 for t, _ in post)
            slope = sum((t - mt) * (k - mk) for t, k in post) / var * 60 / 1024 if var else None
        rss_info.update(start_mib=round(rss[0][1] / 1024, 1), warm_mib=round(after_warm[0] / 1024, 1),
                        warm_at_s=warm_t, end_mib=round(rss[-1][1] / 1024, 1),
                        max_mib=round(max(k for _, k in rss) / 1024, 1),
                        growth_mib=round((rss[-1][1] - after_warm[0]) / 1024, 1),
                        slope_mib_per_min=None if slope is None else round(slope, 2))

    m = final.get("metrics") or {}
    # Counters as the change since the first sample: the server's startup (/health answering 503 while
    # the model loads) and, with --url, whatever it served before are not this run's doing.
    base = (sampler.samples[0].get("metrics") or {}) if sampler.samples else {}

    def since_start(name: str, label: str) -> dict[str, float]:
        before = by_label(base, name, label)
        return {k: int(v - before.get(k, 0)) for k, v in by_label(m, name, label).items() if v - before.get(k, 0)}

    server = {
        "active_sequences": final.get("active"), "queue_depth": final.get("queue"), "drained_s": drained_s,
        "requests_by_status": since_start("ggufchat_requests_total", "status"),
        "cancelled": since_start("ggufchat_sequences_cancelled_total", "why"),
        "finished": since_start("ggufchat_sequences_finished_total", "reason"),
        "generated_tokens": (gauge(m, "ggufchat_generated_tokens_total") or 0)
        - (gauge(base, "ggufchat_generated_tokens_total") or 0),
        "scrape_ms_max": max((s.get("scrape_ms") or 0 for s in sampler.samples), default=None),
        "scrape_errors": sampler.scrape_errors[:5], "n_scrape_errors": len(sampler.scrape_errors),
        **engine_progress(sampler.samples),
    }

    reasons: list[str] = []
    by_failure = Counter(r.failure for r in failures)
    for key, label in FAILURES.items():
        if by_failure[key]:
            first = next(r.detail for r in failures if r.failure == key)
            reasons.append(f"{by_failure[key]} {label} ({key}), first: {first}")
    server_5xx = sum(v for k, v in server["requests_by_status"].items() if k.startswith("5"))
    if server_5xx:
        reasons.append(f"the server counted {server_5xx} 5xx responses during the run (ggufchat_requests_total)")
    if sampler.scrape_errors:
        reasons.append(f"{len(sampler.scrape_errors)} /metrics scrapes failed, first: {sampler.scrape_errors[0]}")
    if server["active_sequences"] is None or server["queue_depth"] is None:
        reasons.append("ggufchat_active_sequences / ggufchat_queue_depth not readable at the end: leaks unchecked")
    elif server["active_sequences"] > 0 or server["queue_depth"] > 0:
        reasons.append(f"leaked sequences: ggufchat_active_sequences {server['active_sequences']:g}, "
                       f"ggufchat_queue_depth {server['queue_depth']:g} after {args.settle_s:g} s of settling")
    if health["status"] != 200:
        reasons.append(f"/health did not answer 200 within {args.health_timeout:g} s: {health['status']} "
                       f"{health['body']}")
    if rss and rss_info["growth_mib"] > args.rss_growth_mib:
        reasons.append(f"RSS grew {rss_info['growth_mib']} MiB after the warm-up (limit {args.rss_growth_mib:g})")
    if not results:
        reasons.append("no request was sent")

    return {
        "clients": args.clients, "minutes": args.minutes, "disconnect_fraction": args.disconnect_fraction,
        "bad_fraction": args.bad_fraction, "seed": args.seed,
        "requests": {k: dict(v) | {"total": sum(v.values())} for k, v in table.items()},
        "bad_cases": dict(Counter(r.bad_case for r in results if r.kind == "bad")),
        "failures": dict(by_failure),
        "failure_samples": [{"kind": k, "failure": f, "detail": d, "count": n} for (k, f, d), n in
                            Counter((r.kind, r.failure, r.detail) for r in failures).most_common(20)],
        "tokens": tokens, "tokens_in_abandoned": sum(r.tokens for r in results if r.outcome == "abandoned"),
        "wall_s": round(wall, 2), "aggregate_tps": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p95_ms": _ms(percentile(ttft, 95)), "ttft_n": len(ttft),
        "rss": rss_info, "server": server, "health": health,
        "samples": [{k: v for k, v in s.items() if k != "metrics"} for s in sampler.samples],
        "reasons": reasons,
    }


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def format_summary(s: dict) -> str:
    cols = ["ok", "abandoned", "refused", "failed"]
    rows = [["kind", "total", *cols]]
    for kind in KINDS:
        r = s["requests"][kind]
        rows.append([kind, str(r["total"]), *(str(r.get(c, 0)) for c in cols)])
    total = Counter()
    for r in s["requests"].values():
        total.update(r)
    rows.append(["all", str(total["total"]), *(str(total.get(c, 0)) for c in cols)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [_row(r, widths) for r in rows]
    if s["bad_cases"]:
        out.append("bad requests sent: " + ", ".join(f"{k} {v}" for k, v in sorted(s["bad_cases"].items())))
    out.append(f"errors: {sum(s['failures'].values())}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())) + ")" if s["failures"] else ""))
    out.append(f"tokens: {s['tokens']} received ({s['tokens_in_abandoned']} in abandoned requests), "
               f"aggregate {s['aggregate_tps']} t/s over {s['wall_s']} s")
    out.append(f"TTFT: p50 {s['ttft_p50_ms']} ms, p95 {s['ttft_p95_ms']} ms ({s['ttft_n']} streams)")
    r = s["rss"]
    if r["sampled"]:
        slope = "" if r["slope_mib_per_min"] is None else f", trend {r['slope_mib_per_min']:+} MiB/min after warm-up"
        out.append(f"RSS: start {r['start_mib']} MiB, after warm-up ({r['warm_at_s']:g} s) {r['warm_mib']} MiB, "
                   f"end {r['end_mib']} MiB, max {r['max_mib']} MiB; growth after warm-up {r['growth_mib']:+} MiB"
                   f"{slope}")
    else:
        out.append("RSS: not sampled (--url without --server-pid)")
    sv = s["server"]
    drained = "" if sv["drained_s"] is None else f" (drained {sv['drained_s']} s after the clients stopped)"
    out.append(f"at the end: active sequences {_g(sv['active_sequences'])}, queue depth {_g(sv['queue_depth'])}"
               f"{drained}; "
               f"/health {s['health']['status']} in {s['health']['ms']} ms")
    out.append("server counted during the run: requests by status "
               + json.dumps(sv["requests_by_status"], sort_keys=True)
               + ", cancelled " + json.dumps(sv["cancelled"], sort_keys=True) +
               f", /metrics scrape max {sv['scrape_ms_max']} ms")
    if sv.get("engine_steps") is not None:
        out.append(f"engine: {sv['engine_steps']} steps, {sv.get('decode_ms_per_step')} ms in llama_decode per step, "
                   f"longest stall with active sequences {sv['longest_stall_s']} s; server CPU {sv['server_cpu_s']} s; "
                   f"machine load (1 min) max {sv['load1_max']}")
    if "stop" in s:
        out.append(stop_line(s["stop"]))
    if s.get("log_problems"):
        out.append(f"server log: {len(s['log_problems'])} traceback/ERROR lines, first: {s['log_problems'][0]}")
    out += [f"  {x['count']} x {x['kind']}: {x['failure']}: {x['detail']}" for x in s["failure_samples"][:5]]
    out += verdict_lines(s["reasons"])
    return "\n".join(out)


def stop_line(stop: dict) -> str:
    return (f"server stop: exit code {stop['exit_code']} after {stop['stop_s']} s"
            + (" (SIGKILL needed)" if stop["killed"] else ""))


def verdict_lines(reasons: list[str]) -> list[str]:
    """The last lines of a report: PASS, or FAIL and why."""
    return ["FAIL:", *(f"  - {r}" for r in reasons)] if reasons else ["PASS"]


def split_serve_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after `--`, which go to `ggufchat serve`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: list[str] | None = None) -> int:
    argv, serve_args = split_serve_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Arguments after -- go to `ggufchat serve` (e.g. -- -np 8 -c 8192).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--disconnect-fraction", type=float, default=0.3,
                    help="fraction of valid requests the client abandons on purpose (default 0.3)")
    ap.add_argument("--bad-fraction", type=float, default=0.08,
                    help="fraction of requests that must be refused with a 4xx (default 0.08)")
    ap.add_argument("--rss-growth-mib", type=float, default=64.0,
                    help="fail when the server's RSS grows more than this after the warm-up (default 64)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="when the warm-up RSS is taken (default: a quarter of the run, 5..60 s)")
    ap.add_argument("--max-tokens", type=int, default=96,
                    help="max_tokens of each request: at random from 4 to this (default 96)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", default=None, help="soak this server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: sample this process's RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS and /metrics every this many seconds")
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="at most this long for the gauges to reach 0 after the clients stop (default 10)")
    ap.add_argument("--health-timeout", type=float, default=2.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--log-dir", default=None, help="server log folder (default artifacts/soak/<time>)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failure as it happens")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.minutes <= 0 or args.max_tokens < 1 or not 0 <= args.disconnect_fraction <= 1 \
            or not 0 <= args.bad_fraction <= 1:
        ap.error("--clients and --max-tokens >= 1, --minutes > 0, fractions within 0..1")
    if args.url and serve_args:
        ap.error("arguments for serve after -- make no sense with --url")

    proc = None
    log_path = None
    pid = args.server_pid
    if args.url:
        url = args.url
    else:
        log_dir = Path(args.log_dir) if args.log_dir else ROOT / "artifacts" / "soak" / time.strftime("%Y%m%d-%H%M%S")
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "server.log"
        try:
            proc, url = start_server(serve_args, log_path, args.startup_timeout)
        except RuntimeError as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
        pid = proc.pid
    print(f"soak: {args.clients} clients for {args.minutes:g} min against {url}"
          + (f" (pid {pid})" if pid else ""), file=sys.stderr)
    target = Target(url, args.api_key)
    try:
        summary = asyncio.run(soak(args, target, pid))
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        if proc is not None:
            stop_server(proc)
        return 130
    except BaseException:
        if proc is not None:
            stop_server(proc)
        raise
    summary["url"] = url
    summary["serve_args"] = serve_args
    if proc is not None:
        stop = stop_server(proc)
        summary["stop"] = stop
        # uvicorn shuts down on SIGTERM and may re-raise it: a -SIGTERM status is a normal stop.
        if stop["killed"] or stop["exit_code"] not in (0, -signal.SIGTERM):
            summary["reasons"].append(f"the server did not stop cleanly on SIGTERM: {stop}")
        summary["log"] = str(log_path)
        summary["log_problems"] = log_problems(log_path)[:20]
        if summary["log_problems"]:
            summary["reasons"].append(f"the server log has traceback/ERROR lines: {summary['log_problems'][0]}")
    print(format_summary(summary))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["reasons"] else 0


if __name__ == "__main__":
    sys.exit(main())
