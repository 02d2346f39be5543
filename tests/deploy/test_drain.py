"""`ggufchat serve` as a process on SIGTERM: it drains, then exits."""

from __future__ import annotations

import signal
import threading
import time

import requests

from tests.conftest import wait_for
from tests.deploy.cluster import Replica, stream_chat

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_serve_drains_on_sigterm_then_exits(tmp_path):
    """The real process: a stream in flight at SIGTERM finishes, meanwhile the replica is not ready and
    turns new requests away with 503 + Retry-After, then it exits by itself."""
    replica = Replica(tmp_path, "serve", "-np", "2", "-t", "1", "--drain-timeout", "30")
    try:
        replica.wait_ready()
        result = {}
        stream = threading.Thread(target=lambda: result.update(o=stream_chat(replica.url, "long", max_tokens=150)))
        stream.start()
        assert wait_for(lambda: replica.metric("ggufchat_active_sequences") == 1, 30)
        replica.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: requests.get(replica.url + "/health/ready", timeout=5).status_code == 503, 5)
        r = requests.post(replica.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert replica.proc.poll() is None  # still draining: the stream is running
        stream.join(60)
        assert result["o"].ok and result["o"].finish_reason == "length", result["o"].error
        replica.proc.wait(15)
        assert "draining: 1 request(s) in flight" in replica.log()
        assert "Traceback" not in replica.log()
    finally:
        replica.stop()


def test_a_drain_that_runs_past_drain_timeout_ends_and_the_process_exits(tmp_path):
    """--drain-timeout bounds the drain: a stream longer than it is cut, and the process exits within
    the timeout plus uvicorn's last 5 s (what terminationGracePeriodSeconds is sized by)."""
    replica = Replica(tmp_path, "serve", "-np", "1", "-t", "1", "--drain-timeout", "1")
    try:
        replica.wait_ready()
        result = {}
        stream = threading.Thread(target=lambda: result.update(o=stream_chat(replica.url, "endless",
                                                                               max_tokens=3000)))
        stream.start()
        assert wait_for(lambda: replica.metric("ggufchat_active_sequences") == 1, 30)
        t0 = time.monotonic()
        replica.proc.send_signal(signal.SIGTERM)
        replica.proc.wait(30)
        took = time.monotonic() - t0
        stream.join(30)
        assert took < 1 + 5 + 3, took
        assert not result["o"].ok  # cut, not finished: 3000 tokens take far longer
        # (uvicorn then cancels the request's task and logs its CancelledError; nothing else failed.)
        assert "timeout graceful shutdown exceeded" in replica.log()
        print(f"\n--drain-timeout 1 with a stream in flight: exited {took:.1f} s after SIGTERM")
    finally:
        replica.stop()
