"""`ggufchat download https://…`: hub file URLs go through the hub clients, any other .gguf URL is fetched directly."""

from __future__ import annotations

import hashlib
import json

import pytest

from ggufchat.errors import DownloadError, InvalidParameter
from ggufchat.models import hub as hubmod
from ggufchat.models.catalog import parse_spec
from ggufchat.models.hub import download
from ggufchat.models.store import Store, sha256_file
from ggufchat.settings import Settings
from tests.conftest import run_cli
from tests.gguf_split import split_gguf
from tests.hubserver import FakeHub
from tests.models.conftest import HF_REPO, MS_REPO, QUANT_FILE


def settings(tmp_path, hub: FakeHub) -> Settings:
    return Settings(home=tmp_path / "home", hf_endpoint=hub.url, ms_endpoint=hub.url)


def cli_env(tmp_path, hub: FakeHub) -> dict[str, str]:
    return {"GGUFCHAT_HOME": str(tmp_path / "home"), "GGUFCHAT_HF_ENDPOINT": hub.url,
            "GGUFCHAT_MS_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_HOME": str(tmp_path / "ms")}


def test_url_specs():
    ref = parse_spec("https://huggingface.co/Qwen/Qwen2-7B-Instruct-GGUF/resolve/main/sub/m-q4_0.gguf?download=true")
    assert (ref.kind, ref.repo, ref.filename, ref.revision) == ("hf", "Qwen/Qwen2-7B-Instruct-GGUF", "sub/m-q4_0.gguf",
                                                                 "main")
    assert ref.display == "hf://Qwen/Qwen2-7B-Instruct-GGUF/sub/m-q4_0.gguf"
    assert parse_spec("https://huggingface.co/o/r/blob/abc123/m.gguf").revision == "abc123"
    for url in ("https://www.modelscope.cn/models/qwen/Qwen2-GGUF/resolve/master/m.gguf",
                "https://modelscope.cn/models/qwen/Qwen2-GGUF/file/view/master/m.gguf",
                "https://www.modelscope.cn/api/v1/models/qwen/Qwen2-GGUF/repo?Revision=master&FilePath=m.gguf"):
        assert parse_spec(url).display == "ms://qwen/Qwen2-GGUF/m.gguf", url
    sha = "AB" * 32
    ref = parse_spec(f"https://example.org/models/m.gguf?sig=secret#sha256={sha}")
    assert (ref.kind, ref.filename, ref.sha256) == ("url", "m.gguf", sha.lower())
    assert ref.display == "https://example.org/models/m.gguf"  # no query (it may hold a token), no fragment
    with pytest.raises(InvalidParameter, match="#sha256="):
        parse_spec("https://example.org/m.gguf#md5=00")
    with pytest.raises(InvalidParameter, match="does not point at a .gguf"):
        parse_spec("https://huggingface.co/o/r/resolve/main/README.md")


def test_url_is_installed_listed_and_loads(tmp_path, gguf):
    with FakeHub() as h:
        url = h.add_url_file("models/tiny-q4_1.gguf", gguf)
        env = cli_env(tmp_path, h)
        sha = hashlib.sha256(gguf).hexdigest()
        result = run_cli("download", f"{url}#sha256={sha}", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("tiny-q4_1.gguf")
    assert "100%" in result.stderr  # the progress bar, on stderr
    rows = [json.loads(line) for line in run_cli("list", "--json", env=env).stdout.splitlines()]
    row = next(r for r in rows if r["name"] == url)
    assert row["source"] == "url" and row["size_bytes"] == len(gguf) and row["architecture"] == "llama"
    (model,) = Store(tmp_path / "home").models()
    assert model.manifest.verified and model.manifest.files[0].sha256 == sha
    assert not list((tmp_path / "home").rglob("*.part*"))  # staging cleaned up
    # The URL is the model's name for every verb.
    chat = run_cli("chat", url, "-p", "Hi", "-n", "4", "--temp", "0", env=env)
    assert chat.returncode == 0, chat.stderr


def test_wrong_sha256_leaves_nothing(tmp_path, gguf):
    with FakeHub() as h:
        url = h.add_url_file("m.gguf", gguf)
        s = settings(tmp_path, h)
        with pytest.raises(DownloadError, match="failed its checksum") as info:
            download(url + "#sha256=" + "0" * 64, s)
        assert "deleted" in str(info.value)
        assert Store(s.home).models() == []
        locks = Store(s.home).downloads_dir / "locks"  # an empty lock file may stay: it never looks like a model
        assert not [p for p in s.home.rglob("*") if p.is_file() and p.parent != locks]
        # --sha256 is the same check; a good one passes and marks the manifest verified.
        with pytest.raises(DownloadError, match="failed its checksum"):
            download(url, s, sha256="1" * 64)
        assert download(url, s, sha256=hashlib.sha256(gguf).hexdigest()).manifest.verified
        with pytest.raises(DownloadError, match="64 hex"):
            download(url, s, sha256="abc")


def test_hugging_face_url_goes_through_the_hub(tmp_path, hub):
    s = settings(tmp_path, hub)  # huggingface.co itself is not reachable here: hf_endpoint points at the fake hub
    model = download(f"https://huggingface.co/{HF_REPO}/resolve/main/{QUANT_FILE}?download=true", s)
    assert model.name == f"hf://{HF_REPO}/{QUANT_FILE}"
    assert model.manifest.source == "hf" and model.manifest.verified and model.manifest.revision == "main"
    assert any(m == "HEAD" and p.startswith(f"/{HF_REPO}/resolve/main/{QUANT_FILE}") for m, p, _ in hub.requests)
    assert any(p.startswith(f"/api/models/{HF_REPO}") for _, p, _ in hub.requests)  # the listing, with sha256
    # The same URL names the cached model for other verbs.
    assert download(f"https://huggingface.co/{HF_REPO}/blob/main/{QUANT_FILE}", s).path == model.path


def test_modelscope_url_goes_through_the_hub(tmp_path, hub):
    s = settings(tmp_path, hub)
    model = download(f"https://www.modelscope.cn/models/{MS_REPO}/resolve/master/{QUANT_FILE}", s)
    assert model.name == f"ms://{MS_REPO}/{QUANT_FILE}" and model.manifest.source == "ms"
    assert any(f"FilePath={QUANT_FILE}" in p for _, p, _ in hub.requests)


def test_split_model_by_url(tmp_path, model_path):
    with FakeHub() as h:
        parts = split_gguf(model_path, tmp_path, "m-q4_1", 3)
        urls = [h.add_url_file(f"dl/{p.name}", p.read_bytes()) for p in parts]
        model = download(urls[0], settings(tmp_path, h))
        with pytest.raises(DownloadError, match="3-part model"):
            download(urls[0] + "#sha256=" + "0" * 64, settings(tmp_path / "b", h))
    assert [f.name for f in model.manifest.files] == [p.name for p in parts]
    assert all(sha256_file(model.folder / p.name) == sha256_file(p) for p in parts)
    assert model.path.name == "m-q4_1-00001-of-00003.gguf"


def test_split_model_by_hub_url_fetches_every_part(tmp_path, hub, model_path):
    for part in split_gguf(model_path, tmp_path, "m-q4_1", 2):
        hub.add_file("org/split-GGUF", part.name, part.read_bytes())
    model = download("https://huggingface.co/org/split-GGUF/resolve/main/m-q4_1-00001-of-00002.gguf",
                     settings(tmp_path, hub))
    assert len(model.manifest.files) == 2 and model.manifest.verified


def test_not_found_not_a_gguf_and_full_disk(tmp_path, gguf, monkeypatch):
    with FakeHub() as h:
        env = cli_env(tmp_path, h)
        result = run_cli("download", f"{h.url}/files/nope/missing.gguf", env=env)
        assert result.returncode == 1
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("Error: ") and "missing.gguf was not found (HTTP 404)" in line
        assert "Traceback" not in result.stderr
        s = settings(tmp_path, h)
        page = h.add_url_file("page.gguf", b"<html>Sign in to download</html>")
        with pytest.raises(DownloadError, match="did not give a GGUF file"):
            download(page, s)
        assert Store(s.home).models() == [] and not list(s.home.rglob("*.part"))
        monkeypatch.setattr(hubmod, "free_bytes", lambda _path: 10 << 20)
        big = h.add_url_file("big.gguf", gguf)
        with pytest.raises(DownloadError, match="GiB free"):
            download(big, s)
        assert not list(s.home.rglob("big.gguf.part"))  # refused before writing a byte


def test_source_does_not_apply_to_urls(tmp_path):
    s = Settings(home=tmp_path / "home")
    with pytest.raises(DownloadError, match="--source hf does not apply"):
        download("https://example.org/m.gguf", s, source="hf")
