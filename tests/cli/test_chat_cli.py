"""`ggufchat chat` through the real command line, with scripted input."""

from __future__ import annotations

import json

import llama_cpp

from ggufchat.engine import Engine, GenerationRequest, SamplingParams
from tests.conftest import chat, run_cli


def _greedy_text(engine: Engine, prompt: str, n: int, system: str | None = None) -> str:
    engine.clear_cache()
    tokens = chat(engine, prompt, system)
    return engine.submit(GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=n)).text()


def test_one_shot_prints_only_the_reply_on_stdout(engine: Engine):
    result = run_cli("chat", "-p", "What is the capital of France?", "-n", "24", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == _greedy_text(engine, "What is the capital of France?", 24).rstrip("\n") + "\n"
    # Which model ran is said on stderr, not stdout.
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr
    assert "SmolLM2" not in result.stdout


def test_prompt_from_stdin(engine: Engine):
    result = run_cli("chat", "-n", "16", "--temp", "0", input="Name a colour.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _greedy_text(engine, "Name a colour.\n", 16).strip()


def test_system_prompt_from_file(engine: Engine, tmp_path):
    f = tmp_path / "sys.txt"
    f.write_text("You are a pirate.")
    result = run_cli("chat", "-f", str(f), "-p", "Hello", "-n", "16", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _greedy_text(engine, "Hello", 16, system="You are a pirate.").strip()


def test_stats_go_to_stderr():
    result = run_cli("chat", "-p", "Hi", "-n", "8", "--temp", "0", "--stats")
    assert result.returncode == 0
    assert "time to first token" in result.stderr
    assert "time to first token" not in result.stdout


def test_scripted_interactive_session():
    script = "Hello\n/stats\n/regen\n/help\n/bogus\n/clear\nWhat is 1+1?\n/exit\n"
    result = run_cli("chat", "-i", "-n", "12", "--temp", "0", input=script)
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("> ") if line.strip()]
    # Hello, its regeneration (greedy: the same text), and the answer after /clear.
    assert len(replies) == 3
    assert replies[0] == replies[1]
    assert "tokens/s" in result.stderr  # /stats
    assert "/regen" in result.stderr  # /help
    assert "unknown command /bogus" in result.stderr
    assert "conversation cleared" in result.stderr


def test_multi_line_message_with_backslash():
    result = run_cli("chat", "-i", "-n", "4", "--temp", "0", "--stats", input="first line\\\nsecond line\n")
    assert result.returncode == 0, result.stderr
    # One message of two lines: one reply (and the session ends at end of input).
    assert result.stderr.count("time to first token") == 1


def test_bad_flags_give_one_error_line():
    for args in (["-ngl", "lots"], ["-fa", "maybe"], ["--temp", "-1"], ["-ctk", "q3"], ["--bogus"],
                 ["-c", "abc"], ["--chat-template", "nope"]):
        result = run_cli("chat", "-p", "hi", *args)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr)


def test_bare_fa_is_accepted_like_llama_cli():
    result = run_cli("chat", "-p", "Hi", "-n", "4", "--temp", "0", "-fa")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_doctor_reports_build_and_default_model(model_path):
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "AVX" in report["llama_cpp"]["system_info"] or "NEON" in report["llama_cpp"]["system_info"]
    # Offload means a GPU backend was built in (CUDA, Metal, ...), whatever the build: RPC and BLAS run
    # on the host, and llama_supports_gpu_offload() says yes for RPC alone.
    ll = report["llama_cpp"]
    assert ll["gpu_offload"] is bool(ll["gpu_backends"])
    assert not set(ll["gpu_backends"]) & {"CPU", "RPC", "BLAS"}
    assert ll["rpc"] is bool(llama_cpp.llama_supports_rpc())
    assert report["default_model"]["path"] == str(model_path)
    assert report["versions"]["llama-cpp-python"] == "0.3.36"
    assert any(d["kind"] == "cpu" for d in report["devices"])
    human = run_cli("doctor")
    assert human.returncode == 0 and "GPU offload" in human.stdout


def test_bench_prints_a_row_per_test():
    result = run_cli("bench", "-p", "32", "-n", "8", "-npp", "16", "-npl", "1,2", "-r", "1", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["test"] for r in rows] == ["pp32", "tg8", "batched pp16", "batched tg8", "batched pp16",
                                        "batched tg8", "edit"]
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert rows[-1]["drafted"] == 0  # --spec none, the default


def test_bench_edit_row_with_speculation():
    result = run_cli("bench", "-p", "16", "-n", "4", "-npp", "8", "-npl", "1", "-r", "1", "--spec", "ngram", "--json")
    assert result.returncode == 0, result.stderr
    edit = json.loads(result.stdout.splitlines()[-1])
    assert edit["test"] == "edit" and edit["tokens"] > 100
    assert 0 < edit["accepted"] <= edit["drafted"]
