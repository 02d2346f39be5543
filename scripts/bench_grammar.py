#!/usr/bin/env python3
"""Decoding under a grammar: the grammar checked after sampling (what the engine does) against the
grammar applied to the whole vocabulary at every step (llama.cpp's plain sampler chain, what it did
before), greedy, on the same engine in the same run, alternating. Also checks that both give the same
text, since greedy must pick the same tokens either way.

    python scripts/bench_grammar.py [--model PATH] [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams  # noqa: E402
from ggufchat.engine import grammar as gbnf  # noqa: E402
from ggufchat.engine.sampling import ChainSampler, build_chain  # noqa: E402
from ggufchat.models.embedded import embedded_model_path  # noqa: E402

CASES = {
    "json_object": ("Describe a cat as a JSON object.", None),
    "object schema": ("Describe a person as JSON.", {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"]}),
    "enum of 200": ("Pick a value.", {"enum": [f"value-{i}" for i in range(200)]}),
    "string maxLength 300": ("Write a sentence about the sea.", {"type": "string", "maxLength": 300}),
}


def run(engine: Engine, prompt: str, grammar: str, max_tokens: int, *, in_chain: bool) -> tuple[str, int, float]:
    params = SamplingParams(temperature=0, grammar=grammar)
    tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
    prepared = engine.prepare(GenerationRequest(tokens, params, max_tokens=max_tokens))
    if in_chain:
        prepared.discard()
        prepared.sampler = ChainSampler(build_chain(params, n_vocab=engine.tokenizer.n_vocab,
                                                    n_ctx_seq=engine.n_ctx_seq, default_seed=0,
                                                    vocab=engine.model.vocab, history=tokens))
    engine.clear_cache()
    t0 = time.perf_counter()
    stream = engine.submit(prepared)
    text = stream.text()
    return text, stream.finish.usage.completion_tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=0)
    args = ap.parse_args()
    engine = Engine(LoadOptions(model_path=args.model or embedded_model_path(), n_seq_max=1, n_ctx=4096,
                                n_threads=args.threads, seed=0))
    print(f"{'case':22} {'tokens':>6} {'in chain t/s':>13} {'checked after t/s':>18} {'ratio':>6}  same text")
    failed = False
    try:
        for name, (prompt, schema) in CASES.items():
            grammar = gbnf.json_object() if schema is None else gbnf.from_schema(schema, gbnf.GrammarLimits())
            rates: dict[bool, list[float]] = {True: [], False: []}
            texts: dict[bool, str] = {}
            n = 0
            for _ in range(args.rounds):
                for in_chain in (True, False):
                    texts[in_chain], n, seconds = run(engine, prompt, grammar, args.max_tokens, in_chain=in_chain)
                    rates[in_chain].append(n / seconds)
            old, new = statistics.median(rates[True]), statistics.median(rates[False])
            same = texts[True] == texts[False]
            failed |= not same
            print(f"{name:22} {n:6} {old:13.1f} {new:18.1f} {new / old:6.2f}  {'yes' if same else 'NO'}")
    finally:
        engine.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
