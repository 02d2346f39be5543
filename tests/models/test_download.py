"""`ggufchat download` with the real hub clients against the fake hub on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from ggufchat.errors import DownloadError
from ggufchat.models import hub as hubmod
from ggufchat.models.hub import download
from ggufchat.models.store import Store
from ggufchat.settings import Settings
from tests.conftest import run_cli
from tests.gguf_split import split_gguf
from tests.hubserver import FakeHub
from tests.models.conftest import HF_REPO, MS_REPO


def settings(tmp_path, hub: FakeHub, **kw) -> Settings:
    return Settings(home=tmp_path / "home", hf_endpoint=hub.url, ms_endpoint=hub.url, **kw)


def test_alias_from_hugging_face_then_loads(tmp_path, hub):
    s = settings(tmp_path, hub)
    model = download("qwen2-7b-instruct:q4_1", s)
    assert model.name == "qwen2-7b-instruct:q4_1"
    assert model.manifest.source == "hf" and model.manifest.verified
    assert model.path.read_bytes()[:4] == b"GGUF"
    # Every verb resolves the alias from the cache now.
    env = {"GGUFCHAT_HOME": str(s.home)}
    result = run_cli("chat", "qwen2-7b-instruct:q4_1", "-p", "Hi", "-n", "4", "--temp", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert str(s.home) in result.stderr
    # A second download is a no-op.
    assert download("qwen2-7b-instruct:q4_1", s).path == model.path


def test_modelscope_source_and_auto_fallback(tmp_path, hub, gguf):
    s = settings(tmp_path, hub)
    model = download("qwen2-7b-instruct:q4_1", s, source="ms")
    assert model.manifest.source == "ms" and model.manifest.repo == MS_REPO
    # auto: Hugging Face lacks the repo, so ModelScope serves it.
    with FakeHub() as only_ms:
        only_ms.add_file(MS_REPO, "qwen2-7b-instruct-q4_1.gguf", gguf, hubs=("ms",))
        s2 = settings(tmp_path / "b", only_ms)
        assert download("qwen2-7b-instruct:q4_1", s2).manifest.source == "ms"


def test_explicit_repo_and_file(tmp_path, hub):
    s = settings(tmp_path, hub)
    model = download(f"ms://{MS_REPO}/qwen2-7b-instruct-q4_1.gguf", s)
    assert model.name == f"ms://{MS_REPO}/qwen2-7b-instruct-q4_1.gguf"
    with pytest.raises(DownloadError, match="offers: q4_1, q8_0"):
        download(f"hf://{HF_REPO}:q5_k_m", s)


def test_split_files_are_all_fetched_and_load_as_one_model(tmp_path, hub, model_path):
    for part in split_gguf(model_path, tmp_path, "m-q4_1", 3):
        hub.add_file("org/split-GGUF", part.name, part.read_bytes())
    hub.add_file("org/split-GGUF", "m-q8_0.gguf", b"GGUF")
    s = settings(tmp_path, hub)
    model = download("hf://org/split-GGUF:q4_1", s)
    assert [f.name for f in model.manifest.files] == [f"m-q4_1-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert model.path.name == "m-q4_1-00001-of-00003.gguf"
    env = {"GGUFCHAT_HOME": str(s.home)}
    # Loading the first part loads the model: the same greedy answer as the unsplit file.
    split = run_cli("chat", "hf://org/split-GGUF:q4_1", "-p", "What is 2+2?", "-n", "16", "--temp", "0", env=env)
    whole = run_cli("chat", str(model_path), "-p", "What is 2+2?", "-n", "16", "--temp", "0", env=env)
    assert split.returncode == 0, split.stderr
    assert split.stdout == whole.stdout and split.stdout.strip()
    # `list` adds the parts up.
    rows = [json.loads(line) for line in run_cli("list", "--json", env=env).stdout.splitlines()]
    row = next(r for r in rows if r["name"] == "hf://org/split-GGUF:q4_1")
    assert row["size_bytes"] == model.size
    assert row["parameters"] == next(r for r in rows if r["source"] == "embedded")["parameters"]


def test_resume_after_the_connection_is_cut(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    hub.cut_after(HF_REPO, "qwen2-7b-instruct-q4_1.gguf", 5 << 20)
    model = download("qwen2-7b-instruct:q4_1", settings(tmp_path, hub))
    ranges = [h.get("range") for m, p, h in hub.requests if m == "GET" and p.endswith("q4_1.gguf")]
    assert ranges[0] is None and ranges[-1] and ranges[-1].startswith("bytes=") and ranges[-1] != "bytes=0-"
    assert model.manifest.verified


def test_modelscope_resumes_across_runs(tmp_path, hub):
    hub.cut_after(MS_REPO, "qwen2-7b-instruct-q4_1.gguf", 3 << 20, times=10)
    s = settings(tmp_path, hub)
    with pytest.raises(DownloadError):
        download("qwen2-7b-instruct:q4_1", s, source="ms")
    assert Store(s.home).models() == []  # a cut file is never a model
    (partial,) = s.home.rglob("*.incomplete")  # kept where the next run finds it
    kept = partial.stat().st_size
    assert kept >= 3 << 20
    hub.cut_after(MS_REPO, "qwen2-7b-instruct-q4_1.gguf", 0, times=0)
    before = len(hub.requests)
    model = download("qwen2-7b-instruct:q4_1", s, source="ms")
    ranges = [h.get("range") for m, p, h in hub.requests[before:] if m == "GET" and "FilePath=qwen2" in p]
    assert ranges == [f"bytes={kept}-"]  # the second run fetched only the rest
    assert model.manifest.verified


def test_checksum_mismatch_leaves_nothing(tmp_path, gguf):
    with FakeHub(ms_linked_etag=False) as h:
        h.add_file(HF_REPO, "qwen2-7b-instruct-q4_1.gguf", gguf)
        h.corrupt_sha(HF_REPO, "qwen2-7b-instruct-q4_1.gguf")
        s = settings(tmp_path, h)
        with pytest.raises(DownloadError, match="failed its checksum"):
            download("qwen2-7b-instruct:q4_1", s, source="hf")
    assert Store(s.home).models() == []
    assert not list(s.home.rglob("*.gguf"))


def test_not_found_and_unauthorized(tmp_path, hub):
    s = settings(tmp_path, hub)
    with pytest.raises(DownloadError, match="not found on Hugging Face.*not found on ModelScope"):
        download("qwen2.5-7b-instruct:q4_k_m", s)  # in the catalog, but on neither fake hub
    hub.require_token(HF_REPO, "secret")
    with pytest.raises(DownloadError, match="refused access") as info:
        download("qwen2-7b-instruct:q4_1", s, source="hf")
    assert "HF_TOKEN" in info.value.hint
    model = download("qwen2-7b-instruct:q4_1", s, source="hf", token="secret")
    assert model.manifest.verified
    assert any(h.get("authorization") == "Bearer secret" for _, _, h in hub.requests)


def test_offline_and_full_disk(tmp_path, hub, monkeypatch):
    s = settings(tmp_path, hub, offline=True)
    with pytest.raises(DownloadError, match="OFFLINE"):
        download("qwen2-7b-instruct:q4_1", s)
    monkeypatch.setattr(hubmod, "free_bytes", lambda _path: 10 << 20)
    with pytest.raises(DownloadError, match="GiB free"):
        download("qwen2-7b-instruct:q4_1", settings(tmp_path, hub))
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)


def test_cli_download_prints_the_path_and_never_the_token(tmp_path, hub):
    home = tmp_path / "home"
    token = tmp_path / "token"
    token.write_text("secret\n")
    hub.require_token(HF_REPO, "secret")
    env = {"GGUFCHAT_HOME": str(home), "GGUFCHAT_HF_ENDPOINT": hub.url, "GGUFCHAT_MS_ENDPOINT": hub.url,
           "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_HOME": str(tmp_path / "ms")}
    result = run_cli("download", "qwen2-7b-instruct:q4_1", "--source", "hf", "--token-file", str(token), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("qwen2-7b-instruct-q4_1.gguf")
    assert "secret" not in result.stdout + result.stderr
    bad = run_cli("download", "qwen2-7b-instruct:q4_1", "--source", "hf", env={**env, "GGUFCHAT_HOME": str(
        tmp_path / "other")})
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "refused access" in lines[-1]
    listed = run_cli("list", env=env)
    assert "qwen2-7b-instruct:q4_1" in listed.stdout


def test_chat_pull_downloads_then_answers(tmp_path, hub):
    home = tmp_path / "home"
    env = {"GGUFCHAT_HOME": str(home), "GGUFCHAT_HF_ENDPOINT": hub.url, "GGUFCHAT_MS_ENDPOINT": hub.url,
           "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_HOME": str(tmp_path / "ms")}
    missing = run_cli("chat", "qwen2-7b-instruct:q4_1", "-p", "Hi", "-n", "4", env=env)
    assert missing.returncode == 1 and "--pull" in missing.stderr
    result = run_cli("chat", "qwen2-7b-instruct:q4_1", "--pull", "-p", "Hi", "-n", "4", "--temp", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "saved qwen2-7b-instruct:q4_1" in result.stderr and result.stdout.strip()
