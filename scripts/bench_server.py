#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server: C concurrent streaming clients per level.

Each client sends its requests back to back (`"stream": true`, temperature 0, `max_tokens`,
`"ignore_eos": true` so every request decodes max_tokens tokens); every request in the run gets its
own prompt, so a server's prompt cache gets no free hits between clients or levels. A short warm-up
request goes first and is not counted. Per level it prints: requests, aggregate tokens/s (all
completion tokens over the wall time from the first send to the last finish), TTFT p50/p95 (send to
the first non-empty content chunk), inter-token latency p50/p95 (gaps between successive content
chunks), completion tokens per request and errors.

    python scripts/bench_server.py --url http://127.0.0.1:8080 --concurrency 1,4,8,16 --max-tokens 128 \\
        [--requests-per-client 2] [--api-key K] [--endpoint chat|completions] [--json OUT]

If the server answers the warm-up with a 4xx, the request is retried without `ignore_eos` (then also
without `stream_options`) and the run goes on without the rejected fields; the output says so.
Completion tokens come from the usage chunk when the server sends one, else from counting content
chunks. The HTTP client is plain asyncio streams (no dependency; light on a CPU shared with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "a city under the sea", "a time traveller",
    "a haunted violin", "the last tree on Mars", "a detective cat", "a mountain village", "a clockmaker's apprentice",
    "a pirate astronomer", "a forgotten library", "a desert caravan", "a talking river", "an arctic expedition",
    "a circus on the moon", "a garden of glass", "a shy giant", "a storm chaser", "a kingdom of bees",
]


class HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0  # non-empty content chunks
    usage_tokens: bool = False  # the count came from a usage chunk
    start: float = 0.0
    end: float = 0.0
    error: str | None = None


# --- a minimal HTTP/1.1 client for one streamed POST -------------------------------------------------


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the response body in pieces as they arrive (chunked, Content-Length or until close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after the chunk
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise ConnectionError("connection closed before Content-Length bytes")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def stream_post(host: str, port: int, path: str, payload: dict, api_key: str | None):
    """POST JSON and yield (arrival time, SSE data string) for each server-sent event."""
    body = json.dumps(payload).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection without a response")
        parts = status_line.decode("latin-1").split(" ", 2)
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 300:
            chunks = [c async for c in _read_body(reader, headers)]
            raise HTTPError(status, b"".join(chunks).decode("utf-8", "replace"))
        buf = b""
        data_lines: list[str] = []
        async for piece in _read_body(reader, headers):
            now = time.perf_counter()
            buf += piece
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line = buf[:nl].rstrip(b"\r").decode("utf-8", "replace")
                buf = buf[nl + 1:]
                if not line:  # end of one event
                    if data_lines:
                        yield now, "\n".join(data_lines)
                        data_lines = []
                elif line.startswith("data:"):
                    data_lines.append(line[5:].lstrip(" "))
                # comments (": ping"), event:, id:, retry: lines are ignored
        if data_lines:
            yield time.perf_counter(), "\n".join(data_lines)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


# --- one request ---------------------------------------------------------------------------------------


class Target:
    def __init__(self, url: str, endpoint: str, api_key: str | None, model: str | None):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported, not {url}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        base = parts.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.endpoint = endpoint
        self.path = base + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
        self.api_key = api_key
        self.model = model
        self.ignore_eos = True
        self.stream_options = True
        self.extra: dict = {}
        self.notes: list[str] = []

    def payload(self, prompt: str, max_tokens: int) -> dict:
        # No `model` unless one was given: every server then uses the model it loaded (ggufchat with
        # several models its default one, where an arbitrary name would be a 404).
        p: dict = {"stream": True, "temperature": 0, "max_tokens": max_tokens}
        if self.model:
            p["model"] = self.model
        if self.endpoint == "chat":
            p["messages"] = [{"role": "user", "content": prompt}]
        else:
            p["prompt"] = prompt
        if self.stream_options:
            p["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            p["ignore_eos"] = True
        p.update(self.extra)
        return p


def _content(event: dict, endpoint: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if endpoint == "chat":
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


async def one_request(target: Target, prompt: str, max_tokens: int, timeout: float) -> RequestResult:
    res = RequestResult(ok=False, start=time.perf_counter())
    state = {"chunks": 0, "last": None, "usage": None}

    async def consume() -> None:
        events = stream_post(target.host, target.port, target.path, target.payload(prompt, max_tokens),
                             target.api_key)
        async with contextlib.aclosing(events):
            async for t, data in events:
                if data.strip() == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    raise RuntimeError(f"error event: {json.dumps(event['error'])[:300]}")
                u = event.get("usage")
                if isinstance(u, dict) and u.get("completion_tokens") is not None:
                    state["usage"] = int(u["completion_tokens"])
                if _content(event, target.endpoint):
                    state["chunks"] += 1
                    if state["last"] is None:
                        res.ttft_s = t - res.start
                    else:
                        res.itl_s.append(t - state["last"])
                    state["last"] = t

    try:
        await asyncio.wait_for(consume(), timeout)
        res.end = time.perf_counter()
        res.chunks = state["chunks"]
        res.tokens = state["usage"] if state["usage"] is not None else state["chunks"]
        res.usage_tokens = state["usage"] is not None
        res.ok = res.tokens > 0
        if not res.ok:
            res.error = "no content tokens in the response (the server stopped at once)"
    except HTTPError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        res.end = time.perf_counter()
        res.error = f"timed out after {timeout:g} s"
    except Exception as e:  # every failure is counted; the run goes on
        res.end = time.perf_counter()
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _request_or_error(target: Target, prompt: str, max_tokens: int, timeout: float) -> RequestResult:
    try:
        return await one_request(target, prompt, max_tokens, timeout)
    except HTTPError as e:
        return RequestResult(ok=False, start=time.perf_counter(), end=time.perf_counter(), error=str(e))


async def warm_up(target: Target, max_tokens: int, timeout: float) -> RequestResult:
    """One short request. On a 4xx it is retried without ignore_eos, then also without stream_options;
    the first variant the server accepts is kept for the run (and the dropped fields noted)."""
    prompt = "Say hello."
    first_error: HTTPError | None = None
    for ignore_eos, stream_options in ((True, True), (False, True), (False, False)):
        target.ignore_eos, target.stream_options = ignore_eos, stream_options
        try:
            res = await one_request(target, prompt, max_tokens, timeout)
        except HTTPError as e:
            if not 400 <= e.status < 500:
                raise
            first_error = first_error or e
            continue
        if first_error is not None:
            dropped = "ignore_eos" if stream_options else "ignore_eos and stream_options"
            target.notes.append(f"the server rejected the request with {first_error}; it accepts it without "
                                f"{dropped}, so the run goes on without {dropped}")
        return res
    assert first_error is not None
    raise first_error


# --- a level and the run -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 1)


_prompt_counter = 0


def next_prompt(client: int, index: int) -> str:
    global _prompt_counter
    n = _prompt_counter
    _prompt_counter += 1
    topic = TOPICS[n % len(TOPICS)]
    return f"Write a long story about {topic} (story {n}, reader {client}-{index}). Make it detailed."


async def run_level(target: Target, concurrency: int, requests_per_client: int, max_tokens: int,
                    timeout: float) -> dict:
    prompts = [[next_prompt(c, i) for i in range(requests_per_client)] for c in range(concurrency)]

    async def client(c: int) -> list[RequestResult]:
        return [await _request_or_error(target, p, max_tokens, timeout) for p in prompts[c]]

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client(c) for c in range(concurrency)))
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.ok]
    wall = (max(r.end for r in results) if results else time.perf_counter()) - t0
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "tokens_from_usage": bool(ok) and all(r.usage_tokens for r in ok),
        "content_chunks_per_request": round(sum(r.chunks for r in ok) / len(ok), 1) if ok else None,
        "aggregate_tps": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "itl_p50_ms": _ms(percentile(itl, 50)),
        "itl_p95_ms": _ms(percentile(itl, 95)),
    }


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(levels: list[dict]) -> str:
    head = ["C", "requests", "tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "tok/req", "errors"]
    rows = [head, ["", "", "(aggr.)", "(ms)", "(ms)", "(ms)", "(ms)", "", ""]]
    for lv in levels:
        rows.append([str(lv["concurrency"]), str(lv["requests"]), _fmt(lv["aggregate_tps"]),
                     _fmt(lv["ttft_p50_ms"], ".0f"), _fmt(lv["ttft_p95_ms"], ".0f"), _fmt(lv["itl_p50_ms"]),
                     _fmt(lv["itl_p95_ms"]), _fmt(lv["tokens_per_request"]), str(lv["errors"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


async def run_bench(url: str, concurrency: list[int], max_tokens: int = 128, requests_per_client: int = 2,
                    api_key: str | None = None, endpoint: str = "chat", model: str | None = None,
                    timeout: float = 600.0, extra: dict | None = None, log=print) -> dict:
    """Warm up, then run every concurrency level in turn; returns the numbers as a dict."""
    target = Target(url, endpoint, api_key, model)
    target.extra = dict(extra or {})
    try:
        w = await warm_up(target, min(max_tokens, 8), timeout)
    except HTTPError as e:
        raise SystemExit(f"warm-up request to {url}{target.path} failed: {e}") from e
    if not w.ok:
        raise SystemExit(f"warm-up request to {url}{target.path} failed: {w.error}")
    for note in target.notes:
        log(f"note: {note}")
    levels = []
    for c in concurrency:
        lv = await run_level(target, c, requests_per_client, max_tokens, timeout)
        levels.append(lv)
        msg = (f"  C={c}: {lv['aggregate_tps']} tok/s, TTFT p50 {lv['ttft_p50_ms']} ms, "
               f"ITL p50 {lv['itl_p50_ms']} ms, {lv['tokens_per_request']} tok/req, {lv['errors']} errors")
        log(msg)
        for sample in lv["error_samples"]:
            log(f"    error: {sample}")
        if lv["ok"] and lv["tokens_per_request"] < 0.95 * max_tokens:
            log(f"    warning: {lv['tokens_per_request']} tokens per request, fewer than max_tokens={max_tokens} "
                "(the server may not honour ignore_eos)")
    return {
        "url": url,
        "endpoint": endpoint,
        "path": target.path,
        "max_tokens": max_tokens,
        "requests_per_client": requests_per_client,
        "sent_ignore_eos": target.ignore_eos,
        "sent_stream_options": target.stream_options,
        "extra_fields": target.extra,
        "notes": target.notes,
        "levels": levels,
    }


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from e
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1: {text}")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--concurrency", type=parse_levels, default=[1, 4, 8, 16], help="levels, e.g. 1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--model", default=None, help='the "model" field (default: none, the server\'s own model)')
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    ap.add_argument("--extra", default=None, help="JSON object merged into every request body")
    ap.add_argument("--json", dest="json_out", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)
    extra = json.loads(args.extra) if args.extra else None
    print(f"benchmarking {args.url} ({args.endpoint}): concurrency {args.concurrency}, "
          f"{args.requests_per_client} requests per client, max_tokens {args.max_tokens}", file=sys.stderr)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        result = asyncio.run(run_bench(args.url, args.concurrency, args.max_tokens, args.requests_per_client,
                                       args.api_key, args.endpoint, args.model, args.timeout, extra, log))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(result["levels"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
