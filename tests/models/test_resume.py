"""A download interrupted in one run (connection cut with retries exhausted, Ctrl-C) continues in the next run.

The hub server's request log shows what the second run asked for: a Range starting past 0.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggufchat.errors import DownloadError
from ggufchat.models import direct
from ggufchat.models.hub import download
from ggufchat.models.store import Store, sha256_file
from ggufchat.settings import Settings
from tests.hubserver import FakeHub
from tests.models.conftest import HF_REPO, MS_REPO, QUANT_FILE

CUT = 5 << 20


def settings(tmp_path, hub: FakeHub) -> Settings:
    return Settings(home=tmp_path / "home", hf_endpoint=hub.url, ms_endpoint=hub.url)


def file_gets(hub: FakeHub, marker: str, since: int = 0) -> list[str | None]:
    """The Range header (None when absent) of each GET for the file, from request number `since` on."""
    return [h.get("range") for m, p, h in hub.requests[since:] if m == "GET" and marker in p]


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(direct, "RETRY_WAIT", 0)


def test_hugging_face_resumes_in_the_next_run(tmp_path, hub, gguf, monkeypatch):
    import huggingface_hub.constants

    # http_get writes whole chunks only (10 MiB by default); 1 MiB chunks keep all 5 MiB received before the cut.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    # The link dies at the same byte every time: huggingface_hub retries 5 times in the run, then gives up.
    hub.cut_after(HF_REPO, QUANT_FILE, CUT, times=10, offset=True)
    s = settings(tmp_path, hub)
    with pytest.raises(DownloadError, match="cut short.*kept") as info:
        download("qwen2-7b-instruct:q4_1", s, source="hf")
    assert "continues where it stopped" in info.value.hint
    assert file_gets(hub, QUANT_FILE) == [None] + [f"bytes={CUT}-"] * 5
    assert Store(s.home).models() == []  # a cut file is never a model
    (part,) = s.home.rglob("*.part")
    assert part.stat().st_size == CUT

    hub.cut_after(HF_REPO, QUANT_FILE, 0, times=0)
    before = len(hub.requests)
    model = download("qwen2-7b-instruct:q4_1", s, source="hf")
    assert file_gets(hub, QUANT_FILE, before) == [f"bytes={CUT}-"]  # only the rest
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest() and model.manifest.verified
    assert not list(s.home.rglob("*.part"))


def test_url_resumes_in_the_next_run(tmp_path, gguf, no_wait):
    with FakeHub() as h:
        url = h.add_url_file("m.gguf", gguf)
        h.cut_after("", "m.gguf", CUT, times=10, offset=True)
        s = settings(tmp_path, h)
        with pytest.raises(DownloadError, match="kept failing.*5242880 bytes are kept"):
            download(url, s)
        assert file_gets(h, "m.gguf") == [None] + [f"bytes={CUT}-"] * (direct.RETRIES + 1)
        assert Store(s.home).models() == []
        h.cut_after("", "m.gguf", 0, times=0)
        before = len(h.requests)
        model = download(url, s)
        (resumed,) = [hd for m, p, hd in h.requests[before:] if m == "GET"]
    assert resumed["range"] == f"bytes={CUT}-"
    assert resumed["if-range"] == f'"{hashlib.sha256(gguf).hexdigest()}"'  # the ETag of the first run
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()


def test_url_cut_within_a_run_resumes_at_once(tmp_path, gguf, no_wait):
    with FakeHub() as h:
        url = h.add_url_file("m.gguf", gguf)
        h.cut_after("", "m.gguf", CUT, times=3)  # three cuts, each after 5 MiB more: progress, so no give-up
        model = download(url, settings(tmp_path, h))
        assert file_gets(h, "m.gguf") == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-", f"bytes={3 * CUT}-"]
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()


def test_url_starts_over_when_the_server_ignores_range(tmp_path, gguf, no_wait):
    with FakeHub() as h:
        url = h.add_url_file("m.gguf", gguf, ignore_range=True)
        h.cut_after("", "m.gguf", CUT, times=10)
        s = settings(tmp_path, h)
        with pytest.raises(DownloadError, match="kept failing"):
            download(url, s)  # every retry gets the whole file again and loses it at the same byte
        h.cut_after("", "m.gguf", 0, times=0)
        before = len(h.requests)
        model = download(url, s)
        assert file_gets(h, "m.gguf", before) == [f"bytes={CUT}-"]  # answered with 200 and the whole file
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()


def test_url_starts_over_when_the_file_changed(tmp_path, gguf, no_wait):
    new = gguf + b"\0" * 4096  # still a valid GGUF, another ETag
    with FakeHub() as h:
        url = h.add_url_file("m.gguf", gguf)
        h.cut_after("", "m.gguf", CUT, times=10, offset=True)
        s = settings(tmp_path, h)
        with pytest.raises(DownloadError):
            download(url, s)
        h.cut_after("", "m.gguf", 0, times=0)
        h.add_url_file("m.gguf", new)  # re-uploaded between the runs; the fake ignores If-Range, so it sends 206
        before = len(h.requests)
        model = download(url, s)
        assert file_gets(h, "m.gguf", before) == [f"bytes={CUT}-", None]  # the 206's ETag differs: start over
    assert sha256_file(model.path) == hashlib.sha256(new).hexdigest()


@pytest.mark.parametrize("source", ["hf", "ms", "url"])
def test_ctrl_c_then_the_next_run_continues(tmp_path, hub, gguf, source):
    """Ctrl-C in the middle of a file (the server hangs there), then the same download again."""
    stall = 25 << 20
    if source == "url":
        spec, key, marker = hub.add_url_file("m.gguf", gguf), ("", "m.gguf"), "/files/m.gguf"
        args = [spec]
    else:
        repo = HF_REPO if source == "hf" else MS_REPO
        spec, key, marker = "qwen2-7b-instruct:q4_1", (repo, QUANT_FILE), QUANT_FILE
        args = [spec, "--source", source]
    hub.stall_after(*key, stall)
    home = tmp_path / "home"
    env = {**os.environ, "NO_COLOR": "1", "GGUFCHAT_HOME": str(home), "GGUFCHAT_HF_ENDPOINT": hub.url,
           "GGUFCHAT_MS_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_HOME": str(tmp_path / "ms")}
    proc = subprocess.Popen([sys.executable, "-m", "ggufchat", "download", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Partial files: ours are *.part (hf, url), modelscope's *.incomplete. hf writes 10 MiB chunks, so 20 of 25.
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in home.rglob("*") if p.suffix in (".part", ".incomplete") and p.stat().st_size >= 20 << 20]
        if partial:
            break
        time.sleep(0.1)
    assert partial, f"no partial file appeared: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (part,) = partial
    kept = part.stat().st_size
    assert 20 << 20 <= kept <= stall
    assert Store(home).models() == []

    before = len(hub.requests)
    model = download(spec, Settings(home=home, hf_endpoint=hub.url, ms_endpoint=hub.url),
                     source="auto" if source == "url" else source)
    assert file_gets(hub, marker, before) == [f"bytes={kept}-"]
    assert sha256_file(model.path) == hashlib.sha256(gguf).hexdigest()
