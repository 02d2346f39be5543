"""scripts/soak.py end to end: a short soak of a real `ggufchat serve` that the script starts itself, and
runs against a small stdlib server that misbehaves on purpose, to prove each failure is caught."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def run_soak(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SOAK), *args], capture_output=True, text=True, timeout=timeout)


def test_soak_real_server_passes(tmp_path: Path):
    out_json = tmp_path / "soak.json"
    # High fractions and short replies, so ~25 s holds abandoned streams and refused bad requests even on a
    # busy machine (with seed 1, client 1's first request is a bad one).
    out = run_soak("--clients", "3", "--minutes", "0.4", "--disconnect-fraction", "0.5", "--bad-fraction", "0.25",
                   "--max-tokens", "16", "--sample-s", "2", "--seed", "1", "--log-dir", str(tmp_path / "logs"),
                   "--json", str(out_json),
                   # -t 1: with both threads of a 2-core machine, llama.cpp's spinning thread barrier makes each
                   # step ~10x slower whenever another process takes a core (measured: 754 vs 83 ms per step).
                   "--", "-np", "2", "-c", "4096", "-t", "1")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for kind in ("kind ", "chat_stream ", "chat ", "completion_stream ", "completion ", "bad ", "all "):
        assert any(line.startswith(kind) for line in lines), kind
    assert any(line.startswith("tokens: ") and " t/s over " in line for line in lines)
    assert any(line.startswith("TTFT: p50 ") for line in lines)
    assert any(line.startswith("RSS: start ") and "growth after warm-up" in line for line in lines)
    assert any(line.startswith("at the end: active sequences 0, queue depth 0") and "/health 200" in line
               for line in lines)
    assert lines[-1] == "PASS"

    s = json.loads(out_json.read_text())
    assert s["failures"] == {} and s["reasons"] == []
    req = s["requests"]
    assert sum(req[k].get("ok", 0) for k in ("chat_stream", "chat", "completion_stream", "completion")) > 0
    assert sum(r.get("abandoned", 0) for r in req.values()) > 0
    assert req["bad"].get("refused", 0) > 0 and req["bad"]["total"] == req["bad"]["refused"]
    assert s["tokens"] > 0 and s["aggregate_tps"] > 0 and s["ttft_p50_ms"] > 0
    assert s["rss"]["start_mib"] > 50  # the model is mapped in: the RSS is the server's, not a shell's
    # The server saw the clients go away: its own counter of cancelled sequences moved.
    assert s["server"]["cancelled"].get("disconnect", 0) > 0
    assert s["server"]["active_sequences"] == 0 and s["server"]["queue_depth"] == 0
    assert s["server"]["engine_steps"] > 0 and s["server"]["server_cpu_s"] > 0
    assert s["stop"]["killed"] is False


# --- a fake OpenAI server: correct in mode "good", one fault in each other mode ----------------------


class Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "good"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict | str, ctype: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/metrics":
            active = 1 if self.mode == "leak" else 0
            self._send(200, f"ggufchat_active_sequences {active}.0\nggufchat_queue_depth 0.0\n", "text/plain")
        else:
            self._send(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if self.mode == "500" and not chat:
            return self._send(500, {"error": {"message": "internal server error", "type": "server_error"}})
        n, max_tokens = body.get("n", 1), body["max_tokens"]
        # Every choice decodes max_tokens tokens: what ignore_eos asks for, and a valid answer otherwise.
        if not body.get("stream"):
            choices = [{"index": i, "finish_reason": "length",
                        **({"message": {"role": "assistant", "content": "x" * max_tokens}} if chat
                           else {"text": "x" * max_tokens})} for i in range(n)]
            return self._send(200, {"choices": choices, "usage": {"completion_tokens": n * max_tokens}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()

        try:
            for t in range(max_tokens):
                if self.mode == "drop" and chat and t == 2:
                    self.connection.shutdown(socket.SHUT_RDWR)  # cut off inside the chunked body
                    return
                for i in range(n):
                    delta = {"delta": {"content": "x"}} if chat else {"text": "x"}
                    event(json.dumps({"choices": [{"index": i, **delta, "finish_reason": None}]}))
                time.sleep(0.005)
            event(json.dumps({"choices": [{"index": i, "finish_reason": "length", **({"delta": {}} if chat else
                                                                                     {"text": ""})}
                                          for i in range(n)]}))
            event(json.dumps({"choices": [], "usage": {"completion_tokens": n * max_tokens}}))
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client abandoned the stream on purpose


@contextmanager
def fake_server(mode: str) -> Iterator[str]:
    handler = type("FakeHandler", (Fake,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def soak_fake(mode: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    with fake_server(mode) as url:
        # No bad requests: the fake does not validate, and would answer them 200.
        out = run_soak("--url", url, "--clients", "2", "--minutes", "0.05", "--bad-fraction", "0",
                       "--sample-s", "1", "--settle-s", "1", "--json", str(tmp_path / "s.json"), *extra, timeout=60)
    return out, json.loads((tmp_path / "s.json").read_text())


def test_soak_fake_good_server_passes(tmp_path: Path):
    # The control: the same fake without a fault passes, so each failure below is the fault's doing.
    out, s = soak_fake("good", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert s["failures"] == {} and s["reasons"] == []
    assert sum(r.get("ok", 0) for r in s["requests"].values()) > 0
    assert s["rss"] == {"sampled": False}
    assert "RSS: not sampled" in out.stdout


@pytest.mark.parametrize(("mode", "failure", "says"), [
    ("500", "5xx", "5xx responses (5xx), first: /v1/completions: HTTP 500"),
    ("drop", "dropped", "cut off by the server"),
    ("leak", None, "leaked sequences: ggufchat_active_sequences 1"),
])
def test_soak_detects_server_faults(mode: str, failure: str | None, says: str, tmp_path: Path):
    out, s = soak_fake(mode, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL:" in out.stdout and says in out.stdout
    assert len(s["reasons"]) == 1  # only the fault, nothing else
    assert s["failures"] == ({failure: s["failures"].get(failure)} if failure else {})
    if failure:
        assert s["failures"][failure] > 0


def test_soak_detects_rss_growth(tmp_path: Path):
    # A process that keeps allocating (and touching) 4 MiB every 0.1 s stands in for a leaking server.
    grower = subprocess.Popen([sys.executable, "-c", "import time\nkeep = []\nfor _ in range(300):\n"
                               "    keep.append(b'x' * (4 << 20))\n    time.sleep(0.1)\ntime.sleep(60)"])
    try:
        out, s = soak_fake("good", tmp_path, "--server-pid", str(grower.pid), "--warmup-s", "0.5",
                           "--rss-growth-mib", "8")
    finally:
        grower.kill()
        grower.wait()
    assert out.returncode == 1, out.stdout + out.stderr
    assert s["rss"]["growth_mib"] > 8 and s["rss"]["slope_mib_per_min"] > 0
    assert [r.split(" after")[0] for r in s["reasons"]] == [f"RSS grew {s['rss']['growth_mib']} MiB"]
    assert "RSS grew" in out.stdout
