"""`ggufchat build`: reinstall llama-cpp-python from source for CUDA / RPC / CPU, then check what it built."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer


def build(
    cuda: Annotated[bool, typer.Option("--cuda", help="Build with the CUDA backend (needs nvcc and the NVIDIA "
                                       "driver).")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Go back to a CPU-only build.")] = False,
    cuda_arch: Annotated[str | None, typer.Option("--cuda-arch", metavar="LIST", help="CUDA compute capabilities, "
                                                  "e.g. '80;86;90' or native (default: llama.cpp's list).")] = None,
    rpc: Annotated[bool, typer.Option("--rpc/--no-rpc", help="Build llama.cpp's RPC backend too, for "
                                      "`rpc-worker` and --rpc (as `make install` does).")] = True,
    jobs: Annotated[int | None, typer.Option("-j", "--jobs", help="Parallel compile jobs (default: CPU "
                                             "count).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands and environment; run "
                                          "nothing.")] = False,
) -> None:
    """Rebuild llama-cpp-python from source in this environment (CUDA, RPC or CPU) and verify the result."""
    from rich.console import Console

    from ggufchat.build import BuildPlan, check_result, failure, preflight, tail, verify
    from ggufchat.settings import load_settings

    plan = BuildPlan.from_flags(cuda=cuda, cpu=cpu, rpc=rpc, cuda_arch=cuda_arch, jobs=jobs)
    log_path = load_settings().home / "build-logs" / \
        f"llama-cpp-python-{plan.version}-{plan.kind.replace(' + ', '-').lower()}-{datetime.now():%Y%m%d-%H%M%S}.log"
    if dry_run:
        print(plan.describe())
        print(f"# log: {log_path}")
        return

    err = Console(stderr=True, highlight=False)
    for check in preflight(plan):
        err.print(f"{check.name + ':':14} {check.detail}", soft_wrap=True)
    err.print(f"building {plan.kind} llama-cpp-python {plan.version} with {plan.jobs} jobs; log: {log_path}",
              soft_wrap=True)
    status = _run_with_progress(plan, log_path, err)
    if status != 0:
        for line in tail(log_path, 20):
            err.print(line, style="dim", markup=False, soft_wrap=True)
        raise failure(plan, status, log_path)

    result = verify(plan.python)
    print(f"llama-cpp-python {result.version} at {result.library}")
    print(f"GPU offload   {'yes' if result.gpu_offload else 'no'}")
    print(f"RPC backend   {'yes' if result.rpc_backend else 'no'}")
    print(f"backends      {', '.join(result.backends)}")
    print(f"devices       {', '.join(result.devices)}")
    print(f"build log     {log_path}")
    check_result(plan, result, log_path)


def _run_with_progress(plan, log_path: Path, err) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ggufchat.build import meaningful, run_pip

    with Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}", markup=False),
                  console=err, transient=True) as progress:
        task = progress.add_task("starting pip", total=None)
        width = max(20, err.width - 20)

        def on_line(line: str) -> None:
            # rich's refresh thread redraws the spinner and the clock; this only swaps the text
            if meaningful(line):
                text = " ".join(line.split())
                progress.update(task, description=text if len(text) <= width else text[: width - 1] + "…")

        return run_pip(plan, log_path, on_line)


def register(app: typer.Typer) -> None:
    app.command("build")(build)
