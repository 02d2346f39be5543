"""The server benchmarks in scripts/ run end to end against a real `ggufchat serve` (tiny sizes: this
checks that they work and count right, not how fast anything is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_bench_server_counts_every_token(url: str, tmp_path: Path):
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench_server.py"), "--url", url, "--concurrency", "1,3",
                          "--max-tokens", "6", "--requests-per-client", "2", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv in result["levels"]:
        assert lv["errors"] == 0 and lv["requests"] == 2 * lv["concurrency"]
        assert lv["tokens_per_request"] == 6 and lv["tokens_from_usage"]  # ignore_eos honoured, usage sent
        assert lv["ttft_p50_ms"] > 0 and lv["itl_p50_ms"] > 0


def test_bench_servers_interleaved_rounds(tmp_path: Path):
    out_json = tmp_path / "servers.json"
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench_servers.py"), "--servers", "ggufchat", "--interleave",
                          "--rounds", "2", "--concurrency", "1,2", "--max-tokens", "5", "--requests-per-client", "1",
                          "--ctx", "4096", "--log-dir", str(tmp_path / "logs"), "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    gg = json.loads(out_json.read_text())["servers"]["ggufchat"]
    assert gg["rounds"] == 2
    for lv in gg["levels"]:
        assert lv["errors"] == 0 and lv["tokens_per_request"] == 5
        assert len(lv["rounds_aggregate_tps"]) == 2 and all(lv["rounds_aggregate_tps"])
    assert "rounds rotating over them" in out.stdout  # the table says how it was measured


def test_bench_verify_prints_every_size():
    out = subprocess.run([sys.executable, str(SCRIPTS / "bench_verify.py"), "--reps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8, 16]
    assert rows[0][-1] == "1.00x"
    # More positions cost more time: the table is measured, not made up.
    assert float(rows[-1][1]) > float(rows[0][1])


def test_replay_drafts_judges_every_policy_on_the_same_replies(tmp_path: Path, model_path: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = [sys.executable, str(SCRIPTS / "replay_drafts.py"), "--model", str(model_path), "--replies", "2",
            "--tasks", "edit,sampled", "--max-tokens", "48", "--reps", "1", "--threads", "1"]
    out = subprocess.run([*args, "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("recorded ") == 4  # 2 replies x 2 tasks, then cached
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["results"]) == {"edit", "sampled"}
    for by_policy in result["results"].values():
        assert set(by_policy) == {"ggufchat", "fixed", "oracle"}
        # The oracle never drafts a token the reply does not have.
        assert by_policy["oracle"]["accepted"] == by_policy["oracle"]["drafted"]
        assert all(r["ratio"] > 0 and r["steps"] > 0 for r in by_policy.values())
    assert float(result["step_ms"]["17"]) > float(result["step_ms"]["1"])  # measured, not made up (--draft-max 16)
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [r[:2] for r in lines if r and r[0] == "edit"] == [["edit", p] for p in ("none", "ggufchat", "fixed",
                                                                                     "oracle")]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "recorded " not in again.stderr  # the recordings were cached
