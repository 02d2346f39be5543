"""Real processes for the deployment tests: `ggufchat serve` replicas and Debian's nginx running the repo's
own deploy/nginx/ggufchat.conf, all on loopback, all stopped by the context managers that start them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.server.conftest import metric

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "ggufchat.conf"
NGINX_REPLICAS = ROOT / "deploy" / "nginx" / "ggufchat-replicas.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `ggufchat serve` process on the embedded model, its log in a file (a pipe nobody reads
    would fill and block the server)."""

    def __init__(self, log_dir: Path, name: str, *args: str) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "NO_COLOR": "1"}
        env.pop("GGUFCHAT_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "serve", "--port", "0", *args],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        self.url = ""

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.url:
            match = re.search(r"on (http://\S+) ", self.log())
            if match:
                self.url = match.group(1)
                break
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 90) -> None:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while requests.get(self.url + "/health/ready", timeout=5).status_code != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        return metric(self.url, name, labels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextmanager
def replicas(tmp: Path, n: int, *args: str) -> Iterator[list[Replica]]:
    """n replicas started together (the loads overlap), each ready before this yields."""
    with ExitStack() as stack:
        started = []
        for i in range(n):
            r = Replica(tmp, f"replica{i}", *args)
            stack.callback(r.stop)
            started.append(r)
        for r in started:
            r.wait_ready()
        yield started


def nginx_config(ports: list[int], listen: int, workdir: Path) -> Path:
    """The shipped deploy/nginx/ggufchat.conf with only its listen port replaced, its replica list (the
    shipped example's `server` lines, addresses swapped for ours) beside it, wrapped in the main context
    a test needs (its own pid, logs and temp paths)."""
    conf, n_listen = re.subn(r"^(\s*)listen \S+;", rf"\1listen 127.0.0.1:{listen};", NGINX_CONF.read_text(),
                             flags=re.M)
    assert n_listen == 1
    (workdir / "ggufchat.conf").write_text(conf)
    example = [line for line in NGINX_REPLICAS.read_text().splitlines() if line.startswith("server ")]
    assert example, "the shipped replica list has no server line"
    params = example[0].removesuffix(";").split()[2:]  # max_fails=... fail_timeout=...
    # Read from the configuration folder (the main file's), as /etc/nginx/ggufchat-replicas.conf is.
    (workdir / "ggufchat-replicas.conf").write_text(
        "".join(f"server 127.0.0.1:{p} {' '.join(params)};\n" for p in ports))
    for sub in ("logs", "tmp"):
        (workdir / sub).mkdir(exist_ok=True)
    main = f"""
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log info;
daemon off;
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    # For the test only: which replica(s) each request went to, and with what status.
    log_format test '$http_x_test_id $status "$upstream_addr" "$upstream_status" $request_time';
    access_log {workdir}/logs/access.log test;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    include {workdir}/ggufchat.conf;
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(main)
    return path


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@dataclass
class Nginx:
    url: str
    workdir: Path
    proc: subprocess.Popen

    def served_by(self, test_id: str, timeout: float = 10) -> str:
        """The replica that answered a request (the last one nginx tried), once nginx has logged it: the
        log line is written when the response ends, a moment after the client read [DONE]."""
        deadline = time.monotonic() + timeout
        while test_id not in (log := self.access_log()):
            assert time.monotonic() < deadline, f"nginx logged no request {test_id}"
            time.sleep(0.02)
        return log[test_id][-1]["upstreams"][-1]

    def access_log(self) -> dict[str, list[dict]]:
        """Test id -> the requests nginx logged with it (each: status, upstreams tried, their statuses)."""
        entries: dict[str, list[dict]] = {}
        for line in (self.workdir / "logs" / "access.log").read_text().splitlines():
            m = re.match(r'(\S+) (\d+) "([^"]*)" "([^"]*)" (\S+)', line)
            if m:
                entries.setdefault(m.group(1), []).append({
                    "status": int(m.group(2)), "upstreams": [u.strip() for u in m.group(3).split(",")],
                    "upstream_status": [s.strip() for s in m.group(4).split(",")], "time": float(m.group(5))})
        return entries


@contextmanager
def nginx(ports: list[int], workdir: Path) -> Iterator[Nginx]:
    binary = nginx_binary()
    assert binary, "nginx is not installed (apt-get install nginx; .ci/run does it)"
    workdir.mkdir(parents=True, exist_ok=True)
    listen = free_port()
    conf = nginx_config(ports, listen, workdir)
    check = subprocess.run([binary, "-t", "-p", str(workdir), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (workdir / "logs" / "error.log").read_text()
                time.sleep(0.05)
        yield Nginx(f"http://127.0.0.1:{listen}", workdir, proc)
    finally:
        proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Outcome:
    """One streamed chat request as a client saw it."""

    test_id: str
    started: float
    ended: float = 0.0
    ok: bool = False
    error: str = ""
    content: str = ""
    finish_reason: str | None = None


def stream_chat(url: str, test_id: str, *, max_tokens: int = 32, user: str | None = None,
                messages: list | None = None, headers: dict | None = None) -> Outcome:
    """POST a streaming chat completion; ok only with a finish_reason, `data: [DONE]` and no error event."""
    out = Outcome(test_id, time.monotonic())
    body = {"messages": messages or [{"role": "user", "content": "Count from one to one hundred."}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    if user is not None:
        body["user"] = user
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=(5, 120),
                           headers={"X-Test-Id": test_id, **(headers or {})}) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            done = False
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = f"error event: {event['error']}"
                    return out
                choice = event["choices"][0]
                out.content += choice["delta"].get("content") or ""
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            out.ok = done and out.finish_reason is not None
            if not out.ok:
                out.error = "the stream ended without finish_reason and [DONE]"
    except (requests.RequestException, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended = time.monotonic()
    return out


@dataclass
class Load:
    """`clients` threads streaming chat requests back to back through `url` until stop()."""

    url: str
    clients: int
    max_tokens: int = 32
    headers: dict | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        self._seq = 0

    def _client(self, i: int) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._seq += 1
                test_id = f"c{i}-{self._seq}"
            outcome = stream_chat(self.url, test_id, max_tokens=self.max_tokens, headers=self.headers)
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
