#!/usr/bin/env python3
"""ggufchat serve, llama-server and llama-cpp-python's server side by side, in one run, on one model.

The servers are started one after another (never two at once), each on a free port on 127.0.0.1 with
the same model, context, threads and slots, benchmarked with scripts/bench_server.py (streaming clients,
ignore_eos, distinct prompts), then stopped before the next one starts:

    ggufchat serve MODEL --host 127.0.0.1 --port P -np 8 -c CTX -t THREADS --spec none
    .build/llama.cpp/bin/llama-server -m MODEL --host 127.0.0.1 --port P -np 8 -kvu -c CTX -t THREADS
    python -m llama_cpp.server --model MODEL --host 127.0.0.1 --port P --n_ctx CTX/8 --n_threads THREADS \\
        --interrupt_requests false

CTX is the total context over all slots (llama.cpp's meaning of -c); llama_cpp.server serves one request
at a time and gets one slot's share. `--interrupt_requests false` keeps it from cutting a streaming
reply short whenever another request arrives (its default), which would not be a fair measurement.
A server that fails to start (e.g. a ggufchat without `serve`) is skipped with a message and its log.
ggufchat runs without speculation, as the other two do by default: this compares plain decoding
(scripts/bench_spec.py compares speculation).

    python scripts/bench_servers.py [--model PATH] [--concurrency 1,4,8,16] [--max-tokens 128]
        [--requests-per-client 2] [--ctx 8192] [--threads 2] [--parallel 8]
        [--servers ggufchat,llama-server,llama-cpp-python] [--rounds 3] [--interleave]
        [--markdown FILE] [--json FILE]

`--interleave` starts all servers at once and rotates short runs over them (round r of level C: each
of C clients sends --requests-per-client requests to one server, then the next server's turn), so the
paired runs are seconds apart instead of minutes; it needs memory for every server at once.

Prints one table: per concurrency level each server's aggregate tokens/s, TTFT p50 and ITL p50, the
ratios ggufchat/llama-server and ggufchat/llama_cpp.server, and the targets (at 8 clients: aggregate
>= 1.1x llama-server and >= 3x llama_cpp.server, TTFT p50 <= llama-server's; at 1 client: aggregate
>= 1.0x llama-server). Server logs go to artifacts/bench_servers/<time>/. Every server process group is
killed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
SERVER_NAMES = ["ggufchat", "llama-server", "llama-cpp-python"]
SHORT = {"ggufchat": "gg", "llama-server": "ls", "llama-cpp-python": "lcp"}
LABEL = {"ggufchat": "ggufchat serve", "llama-server": "llama-server", "llama-cpp-python": "llama_cpp.server"}

_running: dict[int, subprocess.Popen] = {}


@dataclass
class Settings:
    model: str
    ctx: int
    threads: int
    parallel: int
    llama_server: str


def venv_python() -> str:
    p = VENV_BIN / "python"
    return str(p) if p.exists() else sys.executable


def default_model() -> str:
    try:
        from ggufchat.models.embedded import embedded_model_path

        return str(embedded_model_path())
    except ImportError:
        code = "from ggufchat.models.embedded import embedded_model_path; print(embedded_model_path())"
        out = subprocess.run([venv_python(), "-c", code], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"cannot find the embedded model; pass --model\n{out.stderr.strip()}") from None
        return out.stdout.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, s: Settings, port: int) -> tuple[list[str], str]:
    """The command line and the path that answers 200 once the server is ready."""
    common = ["--host", "127.0.0.1", "--port", str(port)]
    if name == "ggufchat":
        exe = VENV_BIN / "ggufchat"
        cmd = [str(exe) if exe.exists() else "ggufchat", "serve", s.model, *common,
               "-np", str(s.parallel), "-c", str(s.ctx), "-t", str(s.threads), "--spec", "none"]
        return cmd, "/health"
    if name == "llama-server":
        cmd = [s.llama_server, "-m", s.model, *common, "-np", str(s.parallel), "-kvu", "-c", str(s.ctx),
               "-t", str(s.threads)]
        return cmd, "/health"
    if name == "llama-cpp-python":
        cmd = [venv_python(), "-m", "llama_cpp.server", "--model", s.model, *common,
               "--n_ctx", str(max(1, s.ctx // s.parallel)), "--n_threads", str(s.threads),
               "--interrupt_requests", "false"]
        return cmd, "/v1/models"
    raise ValueError(name)


def preflight(name: str, s: Settings) -> str | None:
    """Why this server cannot be started, or None."""
    if name == "llama-server" and not os.access(s.llama_server, os.X_OK):
        return f"{s.llama_server} not found (build it with scripts/build_llama_tools.sh)"
    if name == "llama-cpp-python":
        code = "import llama_cpp.server.app, sse_starlette, starlette_context, uvicorn, fastapi"
        out = subprocess.run([venv_python(), "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            return f"llama_cpp.server cannot be imported ({last}); pip install sse-starlette starlette-context"
    return None


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left."""
    _running.pop(proc.pid, None)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the leader may be gone while children of its group live on
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop_all() -> None:
    for proc in list(_running.values()):
        stop(proc)


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


def start(name: str, s: Settings, log_path: Path, startup_timeout: float) -> tuple[subprocess.Popen, str] | None:
    port = free_port()
    cmd, ready_path = server_command(name, s, port)
    print(f"\n== {LABEL[name]}: {' '.join(cmd)}", file=sys.stderr)
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    except OSError as e:
        print(f"   {LABEL[name]} could not be started: {e}; skipped", file=sys.stderr)
        return None
    finally:
        log.close()
    _running[proc.pid] = proc
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"   {LABEL[name]} exited with status {proc.returncode} before it was ready; skipped. "
                  f"Log: {log_path}\n{log_tail(log_path)}", file=sys.stderr)
            stop(proc)
            return None
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2) as r:
                if r.status == 200:
                    print(f"   ready on {url} after {startup_timeout - (deadline - time.monotonic()):.1f} s",
                          file=sys.stderr)
                    return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    print(f"   {LABEL[name]} not ready after {startup_timeout:g} s; skipped. Log: {log_path}\n{log_tail(log_path)}",
          file=sys.stderr)
    stop(proc)
    return None


def bench_one(name: str, s: Settings, args, log_dir: Path) -> dict | None:
    why = preflight(name, s)
    if why:
        print(f"\n== {LABEL[name]}: skipped: {why}", file=sys.stderr)
        return None
    log_path = log_dir / f"{name}.log"
    started = start(name, s, log_path, args.startup_timeout)
    if started is None:
        return None
    proc, url = started
    try:
        result = asyncio.run(bench_server.run_bench(
            url, args.concurrency, args.max_tokens, args.requests_per_client, endpoint=args.endpoint,
            timeout=args.timeout, log=lambda m: print(m, file=sys.stderr)))
    except SystemExit as e:
        print(f"   {LABEL[name]}: {e}; skipped. Log: {log_path}\n{log_tail(log_path)}", file=sys.stderr)
        return None
    finally:
        stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, None) or any(
            lv["errors"] for lv in result["levels"]):
        print(f"   {LABEL[name]}: errors during the run; log: {log_path}", file=sys.stderr)
    result["server"] = name
    result["command"] = server_command(name, s, 0)[0]
    result["log"] = str(log_path)
    print(bench_server.format_table(result["levels"]), file=sys.stderr)
    return result


def bench_interleaved(names: list[str], s: Settings, args, log_dir: Path) -> dict[str, list[dict]]:
    """Every server up at once (all idle but the one under load); per level, `--rounds` short runs that
    rotate over the servers. Runs minutes apart see a different machine (this kind of box drifts by
    more than the margins measured), runs seconds apart see the same one. Needs memory for all servers."""
    up: dict[str, tuple[subprocess.Popen, bench_server.Target]] = {}
    for name in names:
        why = preflight(name, s)
        if why:
            print(f"\n== {LABEL[name]}: skipped: {why}", file=sys.stderr)
            continue
        started = start(name, s, log_dir / f"{name}.log", args.startup_timeout)
        if started is None:
            continue
        target = bench_server.Target(started[1], args.endpoint, None, None)
        try:
            w = asyncio.run(bench_server.warm_up(target, 8, args.timeout))
        except bench_server.HTTPError as e:
            w = bench_server.RequestResult(ok=False, error=str(e))
        if not w.ok:
            print(f"   {LABEL[name]}: warm-up failed ({w.error}); skipped", file=sys.stderr)
            stop(started[0])
            continue
        for note in target.notes:
            print(f"   note: {note}", file=sys.stderr)
        up[name] = (started[0], target)
    runs: dict[str, list[dict]] = {name: [] for name in up}
    for round_no in range(args.rounds):
        order = [n for n in up if not (n == "llama-cpp-python" and round_no >= args.lcp_rounds)]
        order = order[round_no % len(order):] + order[:round_no % len(order)] if order else order
        levels: dict[str, list[dict]] = {name: [] for name in order}
        for c in args.concurrency:
            for name in order:
                lv = asyncio.run(bench_server.run_level(up[name][1], c, args.requests_per_client, args.max_tokens,
                                                        args.timeout))
                print(f"-- round {round_no + 1}/{args.rounds} C={c} {LABEL[name]}: {lv['aggregate_tps']} tok/s, "
                      f"TTFT p50 {lv['ttft_p50_ms']} ms, ITL p50 {lv['itl_p50_ms']} ms, {lv['errors']} errors",
                      file=sys.stderr)
                levels[name].append(lv)
        for name in order:
            target = up[name][1]
            runs[name].append({"server": name, "command": server_command(name, s, 0)[0], "levels": levels[name],
                               "log": str(log_dir / f"{name}.log"), "sent_ignore_eos": target.ignore_eos,
                               "notes": target.notes})
    return {name: r for name, r in runs.items() if r}


# --- the combined table --------------------------------------------------------------------------------


def _level(results: dict, name: str, c: int) -> dict | None:
    r = results.get(name)
    if not r:
        return None
    return next((lv for lv in r["levels"] if lv["concurrency"] == c and lv["ok"]), None)


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not a.get(key) or not b.get(key):
        return None
    # With several rounds, the median of the per-round ratios (each round's servers ran minutes apart,
    # so pairing them cancels most of the machine's drift); else the plain ratio.
    pairs = [x / y for x, y in zip(a.get("rounds_" + key, []), b.get("rounds_" + key, []), strict=False) if x and y]
    if len(pairs) > 1:
        return statistics.median(pairs)
    return a[key] / b[key]


def combine_rounds(runs: list[dict]) -> dict:
    """One result from several rounds of the same server: per level, the median of each number, with the
    per-round values kept for the paired ratios."""
    levels = []
    for c in [lv["concurrency"] for lv in runs[0]["levels"]]:
        per_round = [next((lv for lv in r["levels"] if lv["concurrency"] == c), None) for r in runs]
        ok = [lv for lv in per_round if lv and lv["ok"]]
        if not ok:
            levels.append(per_round[0])
            continue
        merged = dict(ok[0])
        for key in ("aggregate_tps", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms"):
            values = [lv[key] for lv in ok if lv.get(key) is not None]
            merged[key] = statistics.median(values) if values else None
            merged["rounds_" + key] = [lv[key] if lv and lv["ok"] else None for lv in per_round]
        merged["errors"] = sum(lv["errors"] for lv in ok)
        levels.append(merged)
    return {**runs[-1], "levels": levels, "rounds": len(runs)}


def _check(ok: bool | None, text: str) -> str:
    return f"{text} n/a" if ok is None else f"{text} {'PASS' if ok else 'FAIL'}"


def targets(results: dict, c: int) -> str:
    gg, ls, lcp = (_level(results, n, c) for n in SERVER_NAMES)
    r_ls, r_lcp = _ratio(gg, ls, "aggregate_tps"), _ratio(gg, lcp, "aggregate_tps")
    if c == 8:
        ttft = None
        if gg and ls and gg["ttft_p50_ms"] is not None and ls["ttft_p50_ms"] is not None:
            ttft = gg["ttft_p50_ms"] <= ls["ttft_p50_ms"]
        return ", ".join([_check(None if r_ls is None else r_ls >= 1.1, ">=1.1x ls"),
                          _check(None if r_lcp is None else r_lcp >= 3.0, ">=3x lcp"),
                          _check(ttft, "TTFT<=ls")])
    if c == 1:
        return _check(None if r_ls is None else r_ls >= 1.0, ">=1.0x ls")
    return ""


def table_rows(results: dict, levels: list[int]) -> list[list[str]]:
    names = [n for n in SERVER_NAMES if n in results]
    f = bench_server._fmt
    head = ["C"] + [f"{SHORT[n]} tok/s" for n in names]
    if "ggufchat" in results:
        head += [f"gg/{SHORT[n]}" for n in names if n != "ggufchat"]
    head += [f"{SHORT[n]} TTFT" for n in names] + [f"{SHORT[n]} ITL" for n in names] + ["targets"]
    rows = [head]
    for c in levels:
        lv = {n: _level(results, n, c) for n in names}
        row = [str(c)] + [f(lv[n] and lv[n]["aggregate_tps"]) for n in names]
        if "ggufchat" in results:
            for n in names:
                if n != "ggufchat":
                    r = _ratio(lv["ggufchat"], lv[n], "aggregate_tps")
                    row.append("-" if r is None else f"{r:.2f}x")
        row += [f(lv[n] and lv[n]["ttft_p50_ms"], ".0f") for n in names]
        row += [f(lv[n] and lv[n]["itl_p50_ms"]) for n in names]
        row.append(targets(results, c))
        rows.append(row)
    return rows


def format_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i < len(r) - 1 else cell for i, (cell, w) in
                               enumerate(zip(r, widths, strict=True))).rstrip() for r in rows)


def format_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" ---: " for _ in rows[0][:-1]) + "| --- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def legend(results: dict, s: Settings, args) -> str:
    used = ", ".join(f"{SHORT[n]} = {LABEL[n]}" for n in SERVER_NAMES if n in results)
    return (f"{used}. Aggregate completion tokens/s over each level's wall time; TTFT and ITL are p50 in ms. "
            f"Model {Path(s.model).name}, -c {s.ctx} total ({s.ctx // s.parallel} per sequence), -np {s.parallel}, "
            f"-t {s.threads}; {args.requests_per_client} streaming requests per client, max_tokens "
            f"{args.max_tokens}, ignore_eos; {os.cpu_count()} CPUs, {platform.machine()}. Rounds: "
            + ", ".join(f"{SHORT[n]} {results[n].get('rounds', 1)}" for n in SERVER_NAMES if n in results)
            + " (medians; ratios are medians of per-round ratios"
            + ("; servers all up at once, rounds rotating over them)." if args.interleave else ")."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf path (default: the embedded model)")
    ap.add_argument("--concurrency", type=bench_server.parse_levels, default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=8 * 1024, help="total context over all sequences (default 8192)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="server slots (-np)")
    ap.add_argument("--servers", default=",".join(SERVER_NAMES), help="comma-separated subset of " +
                    ",".join(SERVER_NAMES))
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every server, alternating (default 3)")
    ap.add_argument("--lcp-rounds", type=int, default=1, help="rounds of llama_cpp.server, the slow one "
                    "(default 1)")
    ap.add_argument("--interleave", action="store_true", help="start every server at once and rotate short "
                    "runs over them, level by level (each round: every client sends --requests-per-client "
                    "requests to one server), instead of one server at a time; pairs measured seconds apart")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--llama-server", default=str(ROOT / ".build" / "llama.cpp" / "bin" / "llama-server"))
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--log-dir", default=None, help="default: artifacts/bench_servers/<time>")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    ap.add_argument("--json", dest="json_out", default=None, help="write every server's numbers to this file")
    args = ap.parse_args(argv)

    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    unknown = [x for x in servers if x not in SERVER_NAMES]
    if unknown or not servers:
        ap.error(f"unknown server(s) {unknown}; choose from {','.join(SERVER_NAMES)}")
    s = Settings(model=str(Path(args.model).resolve()) if args.model else default_model(), ctx=args.ctx,
                 threads=args.threads, parallel=args.parallel, llama_server=args.llama_server)
    log_dir = Path(args.log_dir) if args.log_dir else ROOT / "artifacts" / "bench_servers" / time.strftime(
        "%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"model {s.model}; logs in {log_dir}", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    runs: dict[str, list[dict]] = {}
    try:
        if args.interleave:
            runs = bench_interleaved([n for n in SERVER_NAMES if n in servers], s, args, log_dir)
        for round_no in range(0 if args.interleave else args.rounds):
            # Alternate the order, so no server always runs first (on a cooler machine).
            order = [n for n in SERVER_NAMES if n in servers]
            if round_no % 2:
                order.reverse()
            for name in order:
                if name == "llama-cpp-python" and round_no >= args.lcp_rounds:
                    continue
                print(f"\n-- round {round_no + 1}/{args.rounds}", file=sys.stderr)
                r = bench_one(name, s, args, log_dir)
                if r is not None:
                    runs.setdefault(name, []).append(r)
                time.sleep(1.0)  # let the CPU settle between servers
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        stop_all()

    results = {name: combine_rounds(r) for name, r in runs.items()}
    if not results:
        print("no server could be benchmarked", file=sys.stderr)
        return 1
    rows = table_rows(results, args.concurrency)
    print()
    print(format_text(rows))
    print(legend(results, s, args))
    skipped = [LABEL[n] for n in servers if n not in results]
    if skipped:
        print(f"skipped: {', '.join(skipped)} (see the messages above)")
    if 8 not in args.concurrency or 1 not in args.concurrency:
        print("note: the targets are defined at 1 and 8 clients")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n\n" + legend(results, s, args) + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": s.model, "ctx": s.ctx, "threads": s.threads, "parallel": s.parallel,
                       "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                       "requests_per_client": args.requests_per_client, "skipped": skipped,
                       "servers": results}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
