"""scripts/stall_probe.py end to end: short phases against a real `ggufchat serve` that the script starts
itself, and runs against a small stdlib server that misbehaves on purpose, to prove a wrong status and a
server that stops answering both fail the run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[2] / "scripts" / "stall_probe.py"
# Every phase, in the order the script runs them, with the status its heavy request must get.
EXPECTED = {"messages-110k": 400, "tokenize-3MB": 200, "prompt-3.9MiB": 400, "chat-3MiB": 400,
            "enum-20000": 400, "maxLength-30000": 400, "echo-bad-id": 400}


def run_probe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=timeout)


def test_stall_probe_real_server(tmp_path: Path):
    out_json = tmp_path / "probe.json"
    t0 = time.monotonic()
    # Short phases and streams: ~35 s in all on a busy 2-core machine, most of it the 3 MB /tokenize.
    # -t 1: with both threads of a 2-core machine, llama.cpp's spinning barrier makes steps ~10x slower
    # whenever another process takes a core (see test_soak_script).
    out = run_probe("--phase-seconds", "0.5", "--max-tokens", "40", "--log-dir", str(tmp_path / "logs"),
                    "--json", str(out_json), "--", "-t", "1", "-np", "4")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert time.monotonic() - t0 < 90

    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split()}
    for name in ("baseline", "baseline-end"):  # no heavy request: "-" for its status and count
        assert re.match(rf"{name}\s+-\s+-\s", rows[name]), rows.get(name)
    for name, status in EXPECTED.items():
        # "N x STATUS" alone in the cell: every heavy request of the phase got the expected status.
        assert re.match(rf"{re.escape(name)}\s+{status}\s+\d+ x {status}\s+\d", rows[name]), rows.get(name)
    assert out.stdout.splitlines()[-1] == "PASS"

    s = json.loads(out_json.read_text())
    assert [p["phase"] for p in s["phases"]] == ["baseline", *EXPECTED, "baseline-end"]
    assert s["reasons"] == [] and s["stop"]["killed"] is False
    for p in s["phases"]:
        assert p["health"]["n"] > 0 and p["health"]["errors"] == 0 and p["health"]["p50_ms"] > 0, p["phase"]
        assert p["itl"]["n"] > 0 and p["itl"]["p50_ms"] > 0, p["phase"]
        assert p["streams"]["n_failures"] == 0 and p["engine"]["steps"] > 0, p["phase"]
        if p["phase"] in EXPECTED:
            heavy = p["heavy"]
            assert heavy["n"] >= 1 and heavy["statuses"] == {str(EXPECTED[p["phase"]]): heavy["n"]}
            assert heavy["bytes"] < 4 << 20  # under the server's default body limit
    by_name = {p["phase"]: p["heavy"] for p in s["phases"] if p["phase"] in EXPECTED}
    # The refusals are the ones the phases are about, not some other 400.
    assert "at most 2048" in by_name["messages-110k"]["message"]
    assert "room for" in by_name["prompt-3.9MiB"]["message"] and "room for" in by_name["chat-3MiB"]["message"]
    assert "this server allows" in by_name["enum-20000"]["message"]
    assert "this server allows" in by_name["maxLength-30000"]["message"]
    assert "outside the vocabulary" in by_name["echo-bad-id"]["message"]
    assert by_name["tokenize-3MB"]["response_bytes"] > 10 << 20  # every token with its piece came back


# --- a fake server: healthy streams and /health, and one fault --------------------------------------


class Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the prober expects
    mode = "wrong_status"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b'{"status": "ok"}')
        elif self.path == "/metrics":
            self._send(200, b"ggufchat_engine_steps 10\nggufchat_engine_decode_seconds 0.1\n", "text/plain")
        else:
            self._send(404, b'{"error": {"message": "no such route"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            return self._stream(body["max_tokens"])
        if self.path == "/v1/completions" and body.get("echo"):
            if self.mode == "wrong_status":  # the bad token id accepted
                return self._send(200, b'{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}')
            # "dies": no answer, and no new connection accepted from now on (this handler runs in a thread
            # of its own, so it can wait for the accept loop to stop)
            self.server.shutdown()
            self.server.socket.close()
            self.close_connection = True
            return None
        return self._send(400, b'{"error": {"message": "refused"}}')

    def _stream(self, max_tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for i in range(max_tokens):
                event = json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]})
                payload = f"data: {event}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                self.wfile.flush()
                time.sleep(0.01)
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        except OSError:
            pass  # the probe abandons its streams at the end of a phase


@contextmanager
def fake_server(mode: str) -> Iterator[str]:
    handler = type("FakeMode", (Fake,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if mode != "dies":
            server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode, reason", [
    ("wrong_status", "echo-bad-id: expected HTTP 400, got 200"),
    ("dies", "the server died or stopped answering /health during phase echo-bad-id"),
])
def test_stall_probe_fails_on_a_wrong_status_or_a_dead_server(mode: str, reason: str):
    with fake_server(mode) as url:
        out = run_probe("--url", url, "--kinds", "enum-20000,echo-bad-id,maxLength-30000", "--phase-seconds", "0.3",
                        "--max-tokens", "30", timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "FAIL:" in lines and any(reason in line for line in lines), out.stdout
    # The phase before the fault passed, and the one after a dead server never ran.
    assert re.search(r"^enum-20000\s+400\s+\d+ x 400\s", out.stdout, re.M), out.stdout
    for later in ("maxLength-30000", "baseline-end"):
        assert any(line.startswith(later) for line in lines) == (mode == "wrong_status"), later
