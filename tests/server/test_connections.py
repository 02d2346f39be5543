"""Slow and idle clients over real sockets: the header and body deadlines, the connection limit, keep-alive."""

from __future__ import annotations

import http.client
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time

import pytest
import requests

from ggufchat.server.connections import HttpLimits, raise_open_file_limit
from tests.server.conftest import post, serve

HALF_REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applica"
N_SLOW = 200


@pytest.fixture(autouse=True, scope="module")
def enough_open_files():
    # Every slow socket is two descriptors in this process: the client's end and the server's.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * N_SLOW + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"ulimit -n is {hard}; these tests open {need} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(url: str, send: bytes = b"") -> socket.socket:
    sock = socket.create_connection(_address(url), timeout=5)
    if send:
        sock.sendall(send)
    return sock


def _watch(socks: list[socket.socket], seconds: float, trickle: dict[socket.socket, bytes] | None = None,
           every: float = 0.2) -> list[tuple[float | None, bytes]]:
    """For each socket: when the server closed it (seconds from now; None if still open after `seconds`)
    and what the server sent. Sockets in `trickle` send their bytes again every `every` seconds."""
    start = time.monotonic()
    result = {s: [None, b""] for s in socks}
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    next_send = start
    while selector.get_map() and time.monotonic() - start < seconds:
        if trickle and time.monotonic() >= next_send:
            next_send += every
            for sock, data in trickle.items():
                if result[sock][0] is None:
                    try:
                        sock.sendall(data)
                    except OSError:
                        pass  # closed under us: the read below records when
        for key, _ in selector.select(timeout=0.02):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                result[sock][1] += chunk
            else:
                result[sock][0] = time.monotonic() - start
                selector.unregister(sock)
    selector.close()
    return [tuple(result[s]) for s in socks]


def _is_open(sock: socket.socket) -> bool:
    """Open and silent: the server has neither closed it nor answered on it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(5)


def _response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_silent_or_half_sent_request_is_closed_after_the_header_timeout(engine):
    with serve(engine, limits=HttpLimits(header_timeout=1)) as url:
        silent, half, trickling = _connect(url), _connect(url, HALF_REQUEST), _connect(url, b"GET / HTTP/1.1\r\n")
        closed = _watch([silent, half, trickling], 5, trickle={trickling: b"X-Slow: 1\r\n"})
        for sock in (silent, half, trickling):
            sock.close()
    # Header lines that keep coming do not push the deadline back.
    assert all(when is not None and 0.9 < when < 2.5 for when, _ in closed), closed
    assert closed[0][1] == b""  # nothing was asked, nothing is answered
    for _, raw in closed[1:]:
        status, body = _response(raw)
        assert status == 408 and body["error"]["code"] == "request_timeout", raw


def test_headers_over_the_size_cap_are_refused(engine):
    with serve(engine, limits=HttpLimits(max_header_bytes=1024)) as url:
        small = _connect(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                b"X-Pad: " + b"a" * 900 + b"\r\n\r\n")
        big = _connect(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000)  # no end yet
        (_, fits), (when, refused) = _watch([small, big], 3)
        small.close()
        big.close()
    assert fits.startswith(b"HTTP/1.1 200 ")
    assert when is not None and when < 1
    status, body = _response(refused)
    assert status == 431 and body["error"]["code"] == "request_too_large"


def test_a_body_sent_after_an_early_answer_does_not_keep_the_connection(engine):
    # uvicorn drains a body the app did not read, and each drained byte cancels its keep-alive timer.
    with serve(engine, max_body_bytes=100, limits=HttpLimits(header_timeout=1, keep_alive=5)) as url:
        sock = _connect(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        sock.sendall(b" " * 1000)
        (when, raw), = _watch([sock], 3)
        sock.close()
    assert when is not None and 0.8 < when < 2 and b"HTTP/1.1" not in raw


def test_many_slow_sockets_do_not_starve_a_real_client(engine):
    with serve(engine) as url:  # serve's default limits
        slow = [_connect(url, HALF_REQUEST) for _ in range(N_SLOW)]
        try:
            start = time.monotonic()
            assert requests.get(url + "/health", timeout=10).status_code == 200
            health = time.monotonic() - start
            start = time.monotonic()
            r = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
            completion = time.monotonic() - start
            assert r.status_code == 200, r.text
            # They were held all along, not dropped to make room.
            assert all(_is_open(s) for s in slow)
        finally:
            for sock in slow:
                sock.close()
    print(f"with {N_SLOW} slow sockets open: /health {health * 1000:.0f} ms, completion {completion * 1000:.0f} ms")
    assert health < 1.0 and completion < 5.0


def test_at_the_connection_limit_the_oldest_waiting_socket_makes_room(engine):
    limit = 50
    with serve(engine, limits=HttpLimits(max_connections=limit)) as url:
        slow = [_connect(url, HALF_REQUEST) for _ in range(N_SLOW)]
        try:
            start = time.monotonic()
            assert requests.get(url + "/health", timeout=10).status_code == 200
            health = time.monotonic() - start
            assert post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200
            closed = [i for i, s in enumerate(slow) if not _is_open(s)]
            # Oldest first: what is left open are the newest, and the server stayed at its limit.
            assert closed == list(range(len(closed)))
            assert N_SLOW - limit <= len(closed) <= N_SLOW - limit + 4
            answers = _watch([slow[i] for i in closed], 2)
        finally:
            for sock in slow:
                sock.close()
    print(f"{N_SLOW} slow sockets over a limit of {limit}: /health {health * 1000:.0f} ms")
    assert health < 1.0
    # A socket evicted after its half request was read is told why; one evicted first is just closed.
    told = [_response(raw) for _, raw in answers if raw]
    assert all(status == 503 and body["error"]["code"] == "unavailable" for status, body in told), told
    assert len(told) >= len(closed) // 2


def test_busy_connections_are_not_evicted_and_a_dribbled_body_times_out(engine):
    with serve(engine, limits=HttpLimits(max_connections=3, body_timeout=1)) as url:
        busy = []
        for _ in range(3):
            sock = _connect(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
            # The app asked for the body: the headers are in and the request is running.
            assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
            sock.sendall(b'{"prompt": ')
            busy.append(sock)
        started = time.monotonic()
        r = requests.get(url + "/health", timeout=10)
        assert r.status_code == 503 and r.text == "Service Unavailable"  # uvicorn's own, plain text
        closed = _watch(busy, 5)
        waited = time.monotonic() - started
        for sock in busy:
            sock.close()
        for when, raw in closed:
            status, body = _response(raw)
            assert status == 408 and "body" in body["error"]["message"]
            assert when is not None
        assert waited < 2.5
        assert requests.get(url + "/health", timeout=10).status_code == 200


def test_keep_alive_closes_idle_connections_and_only_them(engine):
    with serve(engine, limits=HttpLimits(keep_alive=1, header_timeout=0.5)) as url:
        host, port = _address(url)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        first = conn.sock
        # Idle longer than the header timeout but within keep-alive: the same connection serves again.
        time.sleep(0.7)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and response.read() and conn.sock is first
        (when, raw), = _watch([first], 4)
        conn.close()
        assert when is not None and 0.8 < when < 2.0 and raw == b""  # closed without an unasked-for answer

        # The next request sent slowly: its bytes cancel uvicorn's keep-alive timer each time, the header
        # deadline (from its first byte) still ends it.
        sock = _connect(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in sock.recv(4096)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        (when, raw), = _watch([sock], 4, trickle={sock: b"X-Slow: 1\r\n"}, every=0.2)
        sock.close()
        assert when is not None and 0.4 < when < 1.2 and b" 408 " in raw

        # A pooled client notices the closed connection and opens another.
        with requests.Session() as session:
            assert session.get(url + "/health", timeout=10).status_code == 200
            assert session.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                                timeout=60).status_code == 200
            time.sleep(1.3)
            assert session.get(url + "/health", timeout=10).status_code == 200
            assert session.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                                timeout=60).status_code == 200


def test_serve_flags_set_the_limits():
    env = {**os.environ, "NO_COLOR": "1", "GGUFCHAT_HEADER_TIMEOUT": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "serve", "--port", "0", "--max-connections", "1"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        url = line.split(" on ")[1].split()[0]
        first = _connect(url, HALF_REQUEST)
        time.sleep(0.2)
        second = _connect(url)  # over --max-connections 1: the first makes room
        (evicted, raw), = _watch([first], 1)
        assert evicted is not None and b" 503 " in raw
        (when, raw), = _watch([second], 3)
        assert when is not None and 0.5 < when < 1.5 and raw == b""  # GGUFCHAT_HEADER_TIMEOUT
        first.close()
        second.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_lifts_a_low_open_file_limit_for_its_connections():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the hard limit on open files is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        raise_open_file_limit(1000)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (1000 + 256, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
