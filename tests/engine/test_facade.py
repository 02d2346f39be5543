"""What callers above the engine read from it through the facade: stats, vocabulary, model identity,
and the process-wide backend the engine modules share."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ggufchat.engine import Delta, Engine, EngineStats, GenerationRequest, SamplingParams
from ggufchat.engine.backend import BACKEND
from ggufchat.engine.devices import gpu_backends
from ggufchat.errors import InvalidParameter
from tests.conftest import N_SEQ, chat, wait_for

ENGINE_DIR = Path(__file__).parents[2] / "ggufchat" / "engine"




def _long(engine: Engine, text: str) -> GenerationRequest:
    return GenerationRequest(chat(engine, text), SamplingParams(temperature=0), max_tokens=400, ignore_eos=True)


def test_stats_follow_a_request_in_flight(fresh: Engine):
    before = fresh.stats()
    assert isinstance(before, EngineStats)
    assert before.active_sequences == 0 and before.queue_depth == 0
    stream = fresh.submit(_long(fresh, "Count to a thousand."))
    events = iter(stream)
    assert isinstance(next(events), Delta)  # it is generating now
    during = fresh.stats()
    assert during.active_sequences == 1
    assert during.steps > before.steps and during.decode_seconds > before.decode_seconds
    stream.cancel()
    for _ in events:
        pass
    assert stream.finish.reason == "cancelled"
    assert wait_for(lambda: fresh.stats().active_sequences == 0, interval=0.005)


def test_stats_count_the_requests_waiting_for_a_slot(fresh: Engine):
    streams = [fresh.submit(_long(fresh, f"Tell story number {i}.")) for i in range(N_SEQ + 2)]
    try:
        assert wait_for(lambda: fresh.stats().active_sequences == N_SEQ and fresh.stats().queue_depth == 2,
                        interval=0.005)
    finally:
        for s in streams:
            s.cancel()
        for s in streams:
            list(s)
    assert wait_for(lambda: fresh.stats().queue_depth == 0 and fresh.stats().active_sequences == 0, interval=0.005)


def test_stats_are_a_snapshot(engine: Engine):
    stats = engine.stats()
    with pytest.raises(AttributeError):
        stats.steps = 0  # frozen: a reader cannot change the engine's counters


def test_vocabulary_is_what_prompts_are_built_from(engine: Engine):
    vocab = engine.vocabulary
    assert vocab.n_vocab == engine.n_vocab > 0
    # A chat prompt starts with what the vocabulary says every prompt starts with.
    tokens = engine.chat_tokens([{"role": "user", "content": "Hi"}])
    assert tokens[:len(vocab.prompt_start)] == vocab.prompt_start
    assert vocab.prompt_start == ([vocab.bos] if vocab.add_bos else [])
    engine.detokenize([vocab.n_vocab - 1])
    with pytest.raises(InvalidParameter, match="outside the vocabulary"):
        engine.detokenize([vocab.n_vocab])
    # SmolLM2's end of sequence is its end-of-turn marker.
    assert vocab.eos == engine.tokenize("<|im_end|>", add_special=False, parse_special=True)[0]


def test_model_identity(engine: Engine):
    assert "Q4_1" in engine.model_description  # the embedded model's quantization, as llama.cpp names it
    summary = engine.offload_summary()
    if gpu_backends():
        assert summary == "CPU only" or re.fullmatch(r"\d+/\d+ layers on .+", summary)
    else:
        assert summary == "CPU only"


def test_the_backend_log_reaches_listeners(model_path):
    from ggufchat.engine import LoadOptions

    lines: list[str] = []
    with BACKEND.log.listening(lines.append):
        Engine(LoadOptions(model_path=model_path, n_ctx=256)).close()
    assert any("llama" in line for line in lines)  # llama.cpp's own loading messages came through
    n = len(lines)
    Engine(LoadOptions(model_path=model_path, n_ctx=256)).close()
    assert len(lines) == n  # and stop once the listener is gone


def test_engine_modules_import_each_other_without_cycles():
    # Imports inside functions are how a cycle hides (the module imports fine until the function runs);
    # at module level, a cycle fails at import. So: every engine-internal import is at module level,
    # and the graph they make has no cycle.
    graph: dict[str, set[str]] = {}
    for path in ENGINE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(id(node) for node in tree.body)
        graph[path.stem] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ggufchat.engine"):
                names = [node.module.removeprefix("ggufchat.engine").lstrip(".")]
                if not names[0]:  # from ggufchat.engine import rpc
                    names = [a.name for a in node.names]
                inner = {n for n in names if (ENGINE_DIR / f"{n}.py").exists()}
                assert id(node) in top or not inner, f"{path.name}:{node.lineno} imports {inner} inside a function"
                graph[path.stem] |= inner
    graph.pop("__init__")
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join(trail + (name,))
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, trail + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())
