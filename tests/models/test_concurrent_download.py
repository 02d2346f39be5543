"""Two processes downloading at once, as two terminals (or `download` beside `chat --pull`) would.

The hub server holds the first download mid-file until the test has seen the second process arrive, so the two
always overlap however slow the machine is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from ggufchat.models import hub as hubmod
from ggufchat.models.hub import download
from ggufchat.models.store import Store, sha256_file
from ggufchat.settings import Settings
from tests.conftest import wait_for as _wait_for
from tests.hubserver import FakeHub
from tests.models.conftest import HF_REPO, QUANT_FILE

wait_for = functools.partial(_wait_for, timeout=30)  # two download processes on 2 cores: give them time

PAUSE = 25 << 20  # huggingface_hub writes 10 MiB chunks: 20 MiB are on disk while the server holds the rest
WAITING = "Waiting for another ggufchat download of"
ALIAS = "qwen2-7b-instruct:q4_1"


@dataclass
class Run:
    """A real `ggufchat download` process; its output goes to files so the test can read it while it runs."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, tmp_path: Path, hub: FakeHub, tag: str, *args: str) -> Run:
        env = {**os.environ, "NO_COLOR": "1", "GGUFCHAT_HOME": str(tmp_path / "home"),
               "GGUFCHAT_HF_ENDPOINT": hub.url, "GGUFCHAT_MS_ENDPOINT": hub.url,
               "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_HOME": str(tmp_path / "ms")}
        env.pop("GGUFCHAT_DEBUG", None)
        out, err = tmp_path / f"{tag}.out", tmp_path / f"{tag}.err"
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "download", *args], env=env,
                                    stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        return cls(proc, out, err)

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:  # a failed assertion must not leave a download running
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def file_gets(hub: FakeHub, marker: str) -> list[str | None]:
    """The Range header (None when absent) of each GET of the file."""
    return [h.get("range") for m, p, h in hub.requests if m == "GET" and marker in p]


def leftovers(home: Path) -> list[Path]:
    """What a finished download must not leave: partial files, staging folders, half-installed model folders.

    Allowed: the lock files (empty, under downloads/locks) and the empty per-hub folders that staging lived in.
    """
    downloads, locks = home / "downloads", home / "downloads" / "locks"
    stray = [p for p in downloads.rglob("*") if p != locks and p.parent != locks
             and not (p.is_dir() and p.parent == downloads and not any(p.iterdir()))]
    stray += [p for p in locks.iterdir() if p.suffix != ".lock" or p.stat().st_size]
    stray += [p for p in (home / "models").iterdir() if not (p / "manifest.json").is_file()]
    return stray


@pytest.mark.parametrize("source", ["hf", "url"])
def test_two_downloads_of_one_model_install_it_once(tmp_path, hub, gguf, runs, source):
    sha = hashlib.sha256(gguf).hexdigest()
    if source == "url":
        spec, key, marker = f"{hub.add_url_file('m.gguf', gguf)}#sha256={sha}", ("", "m.gguf"), "/files/m.gguf"
    else:
        spec, key, marker = ALIAS, (HF_REPO, QUANT_FILE), QUANT_FILE
    resume = hub.pause_after(*key, PAUSE)
    # Started together: either may win the lock; the winner is held mid-file until the other says it waits.
    runs += [Run.start(tmp_path, hub, tag, spec) for tag in ("a", "b")]
    try:
        wait_for(lambda: any(WAITING in r.stderr() for r in runs) or any(r.proc.poll() is not None for r in runs))
    finally:
        resume.set()
    assert [r.finish() for r in runs] == [0, 0], [r.stderr() for r in runs]

    waited = [r for r in runs if WAITING in r.stderr()]
    assert len(waited) == 1, [r.stderr() for r in runs]
    (second,) = waited
    (first,) = [r for r in runs if r is not second]
    home = tmp_path / "home"
    (model,) = Store(home).models()
    lock = Store(home).lock_path(model.name)
    assert f"(lock: {lock})" in second.stderr()
    # The second run reused what the first installed: it never downloaded a byte itself.
    assert "is already downloaded" in second.stderr() and "downloading" not in second.stderr()
    assert "downloading" in first.stderr()
    assert file_gets(hub, marker).count(None) == 1
    assert first.stdout() == second.stdout() == f"{model.path}\n"
    assert sha256_file(model.path) == sha and model.manifest.verified
    assert leftovers(home) == []


def test_two_models_of_one_repo_download_side_by_side(tmp_path, hub, gguf, runs):
    other = gguf + b"\0" * 4096  # still a valid GGUF, another file
    hub.add_file(HF_REPO, "qwen2-7b-instruct-q5_0.gguf", other)
    resume = hub.pause_after(HF_REPO, QUANT_FILE, PAUSE)
    home = tmp_path / "home"
    runs.append(Run.start(tmp_path, hub, "a", ALIAS, "--source", "hf"))
    (first,) = runs
    try:
        assert wait_for(lambda: any(p.stat().st_size >= 20 << 20 for p in home.rglob("*.part"))), first.stderr()
        lines: list[str] = []
        # In this process, while the other one is still in the middle of its file.
        model = download("qwen2-7b-instruct:q5_0", Settings(home=home, hf_endpoint=hub.url), source="hf",
                         report=lines.append)
        assert first.proc.poll() is None  # it did not wait for the other model
        assert not any(WAITING in line for line in lines)
    finally:
        resume.set()
    assert first.finish() == 0, first.stderr()  # and finishing it did not disturb the other one's partial file
    assert sha256_file(model.path) == hashlib.sha256(other).hexdigest()
    models = {m.name: m for m in Store(home).models()}
    assert sorted(models) == [ALIAS, "qwen2-7b-instruct:q5_0"]
    assert sha256_file(models[ALIAS].path) == hashlib.sha256(gguf).hexdigest()
    assert leftovers(home) == []


def test_ctrl_c_while_waiting_exits_cleanly(tmp_path, hub, gguf, runs):
    resume = hub.pause_after(HF_REPO, QUANT_FILE, PAUSE)
    runs.append(Run.start(tmp_path, hub, "a", ALIAS))
    assert wait_for(lambda: file_gets(hub, QUANT_FILE)), runs[0].stderr()  # it holds the lock: it is fetching
    runs.append(Run.start(tmp_path, hub, "b", ALIAS))
    first, second = runs
    try:
        assert wait_for(lambda: WAITING in second.stderr()), second.stderr()
        second.proc.send_signal(signal.SIGINT)
        assert second.finish(30) == 130, second.stderr()
    finally:
        resume.set()
    assert "Traceback" not in second.stderr()
    assert first.finish() == 0, first.stderr()
    (model,) = Store(tmp_path / "home").models()
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()
    assert leftovers(tmp_path / "home") == []


def test_the_waiting_run_continues_when_the_first_is_interrupted(tmp_path, hub, gguf, runs):
    hub.pause_after(HF_REPO, QUANT_FILE, PAUSE)  # never resumed: the first run is interrupted while held
    home = tmp_path / "home"
    runs.append(Run.start(tmp_path, hub, "a", ALIAS))
    assert wait_for(lambda: any(p.stat().st_size >= 20 << 20 for p in home.rglob("*.part"))), runs[0].stderr()
    (part,) = home.rglob("*.part")
    kept = part.stat().st_size  # the server sends nothing more, so this is what the first run leaves
    runs.append(Run.start(tmp_path, hub, "b", ALIAS))
    first, second = runs
    assert wait_for(lambda: WAITING in second.stderr()), second.stderr()
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(30) == 130, first.stderr()
    assert second.finish() == 0, second.stderr()
    assert file_gets(hub, QUANT_FILE) == [None, f"bytes={kept}-"]  # it fetched only what the first one lacked
    (model,) = Store(home).models()
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()
    assert leftovers(home) == []


def test_a_long_wait_keeps_saying_it_waits(tmp_path, hub, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(hubmod, "STILL_WAITING", 0.2)
    home = tmp_path / "home"
    lines: list[str] = []
    holder = FileLock(Store(home).lock_path(ALIAS))  # another process's download, as far as the lock can tell
    holder.acquire()
    try:
        waiting = threading.Thread(target=download, args=(ALIAS, Settings(home=home, hf_endpoint=hub.url)),
                                   kwargs={"source": "hf", "report": lines.append}, daemon=True)
        waiting.start()
        assert wait_for(lambda: sum("still waiting" in line for line in lines) >= 2), lines
        assert not file_gets(hub, QUANT_FILE)  # nothing fetched while the other holds the model
    finally:
        holder.release()
    waiting.join(60)
    assert lines[0].startswith(WAITING) and f"saved {ALIAS}" in lines[-1]
    assert Store(home).find(ALIAS) is not None
