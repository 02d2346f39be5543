"""`ggufchat bench`: prefill and decode speed of the engine, for 1 and for N parallel sequences."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ggufchat.cli import options as o


# run_bench sizes the context for its tests, the seed is pinned so runs compare, and no chat template is
# ever applied: flags for those would be accepted and ignored, so bench does not offer them. It measures
# the engine as llama-bench does, without speculation, unless asked (--spec ngram: the edit row's gain).
@o.engine_options(omit=("n_ctx", "seed", "chat_template", "chat_template_file"), defaults={"spec": "none"})
def bench(
    *,  # engine_flags, filled in by engine_options, has no default
    n_prompt: Annotated[int, typer.Option("-p", "--n-prompt", help="Prompt tokens for the prefill test.")] = 512,
    n_gen: Annotated[int, typer.Option("-n", "--n-gen", help="Tokens generated per sequence.")] = 128,
    n_pp_batched: Annotated[int, typer.Option("-npp", help="Prompt tokens per sequence in the batched "
                                              "tests.")] = 128,
    parallel: Annotated[str, typer.Option("-npl", "--parallel", help="Sequence counts for the batched "
                                          "tests.")] = "1,4,8,16",
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", help="Runs per test (the best "
                                             "counts).")] = 3,
    edit: Annotated[bool, typer.Option("--edit/--no-edit", help="The edit test: a chat reply that copies its "
                                       "prompt (what --spec speeds up).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON lines.")] = False,
    engine_flags: o.EngineFlags,
) -> None:
    """Measure prefill and decode tokens/s (1 sequence, then several in one batch)."""
    from ggufchat.bench import run_bench

    counts = [int(x) for x in parallel.split(",") if x.strip()]
    load = engine_flags.load_options(seed=0, n_seq_max=max(counts))
    results = run_bench(load, n_prompt=n_prompt, n_gen=n_gen, n_pp_batched=n_pp_batched, counts=counts,
                        repetitions=repetitions, edit=edit)
    if as_json:
        for row in results:
            print(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("test", "sequences", "tokens", "seconds", "tokens/s", "drafts accepted",
                  title=f"ggufchat bench: {load.model_path.name} (--spec {load.spec})")
    for row in results:
        drafts = f"{row['accepted']}/{row['drafted']}" if row.get("drafted") else ""
        table.add_row(row["test"], str(row["sequences"]), str(row["tokens"]), f"{row['seconds']:.3f}",
                      f"{row['tokens_per_second']:.1f}", drafts)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
