"""`ggufchat rpc-worker` and `--rpc`: a model split over llama.cpp RPC workers on loopback.

Everything runs as real processes: two workers (llama.cpp's RPC server, compiled into this
llama-cpp-python by `make install`) and the CLI that splits the embedded model across them.

What the devices are is asked, not assumed (tests/backend_facts.py): on a CPU-only machine the workers
serve the CPU and a local load is "CPU only"; on a GPU machine they serve its GPUs, and a load offloads
to the workers and to the local GPUs (llama.cpp's order: RPC devices first).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from ggufchat.engine.rpc import is_loopback, parse_endpoints
from ggufchat.errors import InvalidParameter
from tests import backend_facts
from tests.conftest import run_cli

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "请用一句话介绍你自己。"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rpc-worker exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"rpc-worker did not listen on {port}")


def _start_worker(port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "ggufchat", "rpc-worker", "--port", str(port), "-t", "1",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def workers():
    ports = [_free_port(), _free_port()]
    procs = [_start_worker(p) for p in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            _wait_listening(port, proc)
        yield [f"127.0.0.1:{p}" for p in ports], procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _greedy(*extra: str) -> subprocess.CompletedProcess:
    return run_cli("chat", "--temp", "0", "-n", "48", "-c", "2048", *extra, timeout=180)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_split_over_two_workers_gives_the_local_greedy_tokens(workers, prompt):
    endpoints, _ = workers
    local = _greedy("-p", prompt)
    split = _greedy("-p", prompt, "--rpc", ",".join(endpoints))
    assert local.returncode == 0, local.stderr
    assert split.returncode == 0, split.stderr
    assert split.stdout.strip() and split.stdout == local.stdout
    gpus = backend_facts.offload_names()
    if gpus:  # -ngl auto puts what fits on them (here, with -c 2048, normally all 31)
        assert re.search(rf"\d+/31 layers on {re.escape(', '.join(gpus))}[,)]", local.stderr), local.stderr
    else:
        assert "CPU only" in local.stderr
    # The workers' memory takes every layer; the local GPUs, if any, come after them.
    on = ", ".join([f"RPC0 {endpoints[0]}", f"RPC1 {endpoints[1]}", *gpus])
    assert re.search(rf"31/31 layers on {re.escape(on)}[,)]", split.stderr), split.stderr  # then the drafts


def test_the_layers_really_live_on_the_workers(workers):
    """llama.cpp's own log of the load: both workers hold weights and KV cache, sized as -ngl auto
    estimated them from the GGUF header (with the local GPUs' share, on a machine that has some)."""
    endpoints, _ = workers
    result = _greedy("-p", "hi", "-v", "--rpc", ",".join(endpoints))
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert "offloaded 31/31 layers to GPU" in log
    model_mib = {ep: float(m) for ep, m in re.findall(r"RPC\d\[([\d.:]+)\] model buffer size = +([\d.]+) MiB", log)}
    kv_mib = {ep: float(m) for ep, m in re.findall(r"RPC\d\[([\d.:]+)\] KV buffer size = +([\d.]+) MiB", log)}
    assert set(model_mib) == set(kv_mib) == set(endpoints)
    assert all(v > 0 for v in [*model_mib.values(), *kv_mib.values()])
    for gpu in backend_facts.offload_names():  # "CUDA0 model buffer size", not "CUDA_Host ..."
        for kind, sizes in (("model", model_mib), ("KV", kv_mib)):
            found = re.search(rf"\s{re.escape(gpu)} {kind} buffer size = +([\d.]+) MiB", log)
            sizes[gpu] = float(found.group(1)) if found else 0.0
    estimate = re.search(r"-ngl auto: 31/31 layers offloaded \(all would need ([\d.]+) GiB", log)
    assert estimate, log
    allocated_gib = (sum(model_mib.values()) + sum(kv_mib.values())) / 1024
    assert abs(float(estimate.group(1)) - allocated_gib) <= 0.01


def test_doctor_lists_a_workers_devices(workers):
    endpoints, _ = workers
    result = run_cli("doctor", "--json", "--rpc", endpoints[0])
    assert result.returncode == 0, result.stderr
    import json

    devices = json.loads(result.stdout)["devices"]
    remote = [d for d in devices if d["backend"] == "RPC"]
    assert [d["description"] for d in remote] == [endpoints[0]]
    assert remote[0]["total_bytes"] > 1 << 30  # the worker's own memory, asked over the wire


def test_serve_over_rpc_answers_like_local(workers, tmp_path):
    import requests

    endpoints, _ = workers
    outputs = []
    for extra in ([], ["--rpc", ",".join(endpoints)]):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "serve", "--port", str(port), "-np", "2",
                                 "-c", "2048", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0, "max_tokens": 32})
            assert r.status_code == 200, r.text
            outputs.append(r.json()["choices"][0]["message"]["content"])
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        if extra:
            assert "layers on RPC0" in err
    assert outputs[0] and outputs[0] == outputs[1]


# --- errors --------------------------------------------------------------------------------------

def test_unreachable_worker_is_one_error_line():
    port = _free_port()  # nothing listens there
    result = run_cli("chat", "-p", "hi", "--rpc", f"127.0.0.1:{port}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Error: cannot reach the RPC worker at 127.0.0.1:{port}")
    assert f"ggufchat rpc-worker --host 127.0.0.1 --port {port}" in lines[-1]
    assert result.stdout == ""


@pytest.mark.parametrize("bad", ["127.0.0.1:x", "127.0.0.1:0", ":50052", "a:1,a:1"])
def test_bad_rpc_argument(bad):
    result = run_cli("chat", "-p", "hi", "--rpc", bad)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --rpc ")


def test_parse_endpoints():
    assert parse_endpoints("10.0.0.2:50052, 10.0.0.3:50053") == ["10.0.0.2:50052", "10.0.0.3:50053"]
    assert parse_endpoints("gpu-box") == ["gpu-box:50052"]
    assert parse_endpoints("[::1]:6000") == ["::1:6000"]
    assert parse_endpoints(None) == parse_endpoints("") == []
    with pytest.raises(InvalidParameter):
        parse_endpoints("host:70000")


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("gpu-box")


# --- the worker process ---------------------------------------------------------------------------

def test_worker_stops_on_ctrl_c():
    port = _free_port()
    proc = _start_worker(port)
    _wait_listening(port, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    served = backend_facts.worker_device_names()  # every GPU, else the CPU
    assert f"serving {len(served)} device(s) on 127.0.0.1:{port}" in err
    assert "rpc-worker stopped" in err
    assert "Starting RPC server" in out  # llama.cpp's own banner, then its device list
    assert all(re.search(rf"^\s*{re.escape(name)}:", out, re.M) for name in served), out


def test_worker_on_a_taken_port_is_one_error_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("rpc-worker", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use. Pick another --port, or stop what "
        "is using it."]


def test_worker_unknown_device():
    # ggml registers at most 16 CUDA devices: no machine has a CUDA64.
    result = run_cli("rpc-worker", "--port", str(_free_port()), "--device", "CUDA64")
    assert result.returncode == 1
    names = backend_facts.device_names()  # "CPU" here; "CUDA0, CPU" or the like on a GPU machine
    assert result.stderr.strip().startswith(f"Error: no device named CUDA64; this machine has {', '.join(names)}")


def test_a_build_without_rpc_says_how_to_get_it(monkeypatch):
    # The one seam faked here: this machine's library has RPC, so pretend it was built without.
    import llama_cpp

    from ggufchat.engine import rpc

    monkeypatch.setattr(llama_cpp, "llama_supports_rpc", lambda: False)
    with pytest.raises(rpc.RpcError, match="built without RPC support") as err:
        rpc.connect(["127.0.0.1:50052"])
    # The hint names both rebuilds, whatever this build is: --cuda for a GPU machine, --cpu otherwise.
    assert "ggufchat build --cpu" in err.value.hint and "--cuda" in err.value.hint
