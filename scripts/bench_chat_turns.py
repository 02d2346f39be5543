#!/usr/bin/env python3
"""Time to first token at each turn of one chat conversation (the terminal chat's own path).

Each turn the whole conversation goes to the engine; prefix reuse should make turn N prefill only
the new message, so TTFT stays flat as the conversation grows. Prints a table and the ratio of the
last turn's TTFT to the first's (target: <= 1.3).

    python scripts/bench_chat_turns.py [--turns 8] [--model M] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics

from ggufchat.chat.conversation import TemplateConversation
from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams

QUESTIONS = [
    "What is the tallest mountain in the world?",
    "How high is it in metres?",
    "Who first climbed it?",
    "In which year was that?",
    "Which country is it in?",
    "What is the capital of that country?",
    "What language do people speak there?",
    "Say hello in that language.",
    "What is the weather like there in winter?",
    "Thank you for the answers.",
]


def one_conversation(engine: Engine, turns: int, reply_tokens: int) -> list[tuple[float, int, int]]:
    engine.clear_cache()
    convo = TemplateConversation(engine, "You are a helpful assistant.")
    out = []
    for i in range(turns):
        convo.add_user(QUESTIONS[i % len(QUESTIONS)])
        tokens = convo.prompt_tokens()
        stream = engine.submit(GenerationRequest(tokens, SamplingParams.greedy(), max_tokens=reply_tokens,
                                                 ignore_eos=True))
        ids = stream.tokens()
        u = stream.finish.usage
        convo.add_reply(engine.detokenize(ids), ids, stream.finish)
        out.append((u.time_to_first_token, u.prompt_tokens, u.cached_tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from ggufchat.models.embedded import embedded_model_path

        args.model = str(embedded_model_path())
    with Engine(LoadOptions(model_path=args.model)) as engine:
        runs = [one_conversation(engine, args.turns, args.reply_tokens) for _ in range(args.reps)]
    print("| turn | prompt tokens | cached | TTFT ms (median) |")
    print("| ---: | ---: | ---: | ---: |")
    ttft = []
    for t in range(args.turns):
        med = statistics.median(r[t][0] for r in runs) * 1000
        ttft.append(med)
        print(f"| {t + 1} | {runs[0][t][1]} | {runs[0][t][2]} | {med:.1f} |")
    print(f"\nturn {args.turns} / turn 1 TTFT: {ttft[-1] / ttft[0]:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
