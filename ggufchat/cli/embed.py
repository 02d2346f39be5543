"""`ggufchat embed`: embedding vectors of texts, as JSON lines or a cosine-similarity table."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ggufchat.cli import options as o
from ggufchat.engine import Engine
from ggufchat.errors import InvalidParameter

_EMBED = "Embeddings"


# No chat template is applied, nothing is sampled and nothing is speculated: those flags would be ignored.
@o.engine_options(omit=("chat_template", "chat_template_file", "seed", "spec"))
def embed(
    *,  # engine_flags, filled in by engine_options, has no default
    texts: Annotated[list[str] | None, typer.Argument(
        metavar="TEXT...", help="Texts to embed, after MODEL (or all of them with -m); none: one text per line "
        "of stdin.", show_default=False)] = None,
    similarity: Annotated[bool, typer.Option("--similarity", help="Print the texts' cosine similarities as a "
                                             "table instead of the vectors.", rich_help_panel=_EMBED)] = False,
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="Keep the first N components of each "
                                                   "vector, normalised again (Matryoshka models).",
                                                   rich_help_panel=_EMBED, show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show llama.cpp's log.",
                                          rich_help_panel=_EMBED)] = False,
    engine_flags: o.EngineFlags,
) -> None:
    """Embed texts: one JSON line per text (index, text, tokens, embedding), or a similarity table."""
    if verbose:
        from ggufchat.cli.main import setup_logging

        setup_logging(verbose=True)
    texts = list(texts or [])
    values = engine_flags.values
    if values.get("model") and values.get("model_arg"):
        # With -m every positional is a text; click gave the first one to MODEL.
        texts.insert(0, values["model_arg"])
        values["model_arg"] = None
    if not texts:
        if sys.stdin.isatty():
            raise InvalidParameter("no text to embed", hint="Pass texts after MODEL, or pipe one text per line "
                                                            "into stdin.")
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not texts:
            raise InvalidParameter("stdin held no text", hint="Pipe one text per line, or pass texts after MODEL.")
    # One sequence of generation context is all the engine needs beside its embedding context.
    load = engine_flags.load_options(n_seq_max=1)
    with Engine(load) as engine:
        result = engine.embed(texts, dimensions=dimensions)
        print(f"ggufchat: {len(texts)} texts, {result.prompt_tokens} tokens, {result.dimensions} dimensions, "
              f"{engine.embedding_spec().pooling} pooling ({engine.model_path.name})", file=sys.stderr)
    if similarity:
        _similarity_table(texts, result.vectors)
        return
    out = sys.stdout
    for i, (text, n, row) in enumerate(zip(texts, result.token_counts, result.vectors, strict=True)):
        out.write(json.dumps({"index": i, "text": text, "tokens": n, "embedding": row.tolist()},
                             ensure_ascii=False) + "\n")


def _similarity_table(texts: list[str], vectors) -> None:
    from rich.console import Console
    from rich.table import Table

    from ggufchat.engine.embeddings import cosine_similarity

    sims = cosine_similarity(vectors)
    table = Table("#", "text", *[str(i) for i in range(len(texts))], title="cosine similarity")
    for i, text in enumerate(texts):
        label = text if len(text) <= 40 else text[:39] + "…"
        table.add_row(str(i), label, *[f"{sims[i, j]:.3f}" for j in range(len(texts))])
    Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
