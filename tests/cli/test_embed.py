"""`ggufchat embed` through the real command line."""

from __future__ import annotations

import json

import numpy as np

from ggufchat.engine import Engine
from tests.conftest import run_cli


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_texts_after_model_print_json_lines(minilm_path, minilm_engine: Engine):
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."]
    result = run_cli("embed", str(minilm_path), *texts)
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)  # stdout holds the vectors only
    assert [(r["index"], r["text"]) for r in rows] == list(enumerate(texts))
    vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(vectors, minilm_engine.embed(texts).vectors, atol=1e-6)
    assert [r["tokens"] for r in rows] == minilm_engine.embed(texts).token_counts
    assert "3 texts" in result.stderr and "384 dimensions" in result.stderr and "mean pooling" in result.stderr
    assert "Warning" not in result.stderr and "WARNING" not in result.stderr


def test_model_flag_and_stdin(minilm_path):
    with_m = run_cli("embed", "-m", str(minilm_path), "first text", "second text", "--dimensions", "16")
    assert with_m.returncode == 0, with_m.stderr
    rows = _rows(with_m.stdout)
    assert [r["text"] for r in rows] == ["first text", "second text"]
    assert all(len(r["embedding"]) == 16 for r in rows)
    piped = run_cli("embed", str(minilm_path), "--dimensions", "16", input="first text\n\nsecond text\n")
    assert piped.returncode == 0, piped.stderr
    assert _rows(piped.stdout) == rows  # one text per line; blank lines skipped


def test_similarity_table(minilm_path):
    result = run_cli("embed", str(minilm_path), "--similarity", "How do I bake bread?",
                     "What is a recipe for baking bread?", "The cat sleeps on the sofa.")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip().startswith(("│ 0", "│ 1"))}
    assert "cosine similarity" in result.stdout
    cells = [float(x) for x in rows["0"].replace("│", " ").split()[-3:]]
    assert cells[0] == 1.0 and cells[1] > cells[2] + 0.3  # the paraphrase beats the unrelated sentence


def test_errors_are_one_line(minilm_path):
    too_long = run_cli("embed", str(minilm_path), "word " * 600)
    assert too_long.returncode == 1
    assert too_long.stderr.strip().splitlines()[-1].startswith("Error: input is 602 tokens; this model embeds at "
                                                              "most 512")
    assert too_long.stdout == ""
    bad_dims = run_cli("embed", str(minilm_path), "x", "--dimensions", "0")
    assert bad_dims.returncode == 1 and "Error: dimensions must be between 1 and 384" in bad_dims.stderr
    nothing = run_cli("embed", str(minilm_path), input="\n\n")
    assert nothing.returncode == 1 and "Error: stdin held no text" in nothing.stderr
    no_model = run_cli("embed", "/nonexistent/model.gguf", "text")
    assert no_model.returncode == 1 and no_model.stderr.startswith("Error:")
