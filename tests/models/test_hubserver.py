"""The fake hub (tests/hubserver.py) against the real huggingface_hub and modelscope clients.

These tests pin down how the real clients behave (URLs, resume, checksum, errors) so `ggufchat download` can rely on it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from tests.hubserver import FakeHub

REPO = "org/tiny-GGUF"
FILE = "tiny.Q4_0.gguf"
DATA = bytes(range(256)) * 1200  # 300 KiB, enough for a mid-file cut
SHA = hashlib.sha256(DATA).hexdigest()
TOKEN = "hf_secret_token"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep both clients away from ~/.cache, ~/.modelscope, stored tokens and real endpoints."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT",
                "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
    import modelscope_hub.config

    # modelscope_hub builds one process-wide HubConfig (endpoint, token, cache and home dirs) from the environment on
    # first use; drop it so the variables above apply.
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)


@pytest.fixture
def hub():
    with FakeHub() as h:
        h.add_file(REPO, FILE, DATA)
        h.add_file(REPO, "sub/readme.txt", b"hello")
        yield h


def gets(hub: FakeHub, marker: str) -> list[dict[str, str]]:
    """Headers of the GET requests whose path contains `marker`."""
    return [headers for method, path, headers in hub.requests if method == "GET" and marker in path]


# -- Hugging Face ------------------------------------------------------------------------------------------------------


def test_hf_model_info_and_listing(hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info(REPO, revision="main", files_metadata=True)
    assert info.sha == hub.commit(REPO, "main")
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {FILE, "sub/readme.txt"}
    assert sib[FILE].size == len(DATA)
    assert sib[FILE].lfs.sha256 == SHA and sib[FILE].lfs.size == len(DATA)
    assert sorted(api.list_repo_files(REPO)) == sorted([FILE, "sub/readme.txt"])


def test_hf_download_to_cache_and_local_dir(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(REPO, FILE, revision="main", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == DATA
    commit = hub.commit(REPO, "main")
    assert Path(path) == (tmp_path / "c" / "models--org--tiny-GGUF" / "snapshots" / commit / FILE)
    assert (tmp_path / "c" / "models--org--tiny-GGUF" / "blobs" / SHA).is_file()  # blob named by the ETag
    resolve = [m for m, p, _ in hub.requests if "/resolve/" in p]
    assert resolve == ["HEAD", "GET"]  # metadata HEAD, then one GET of the same URL

    local = hf_hub_download(REPO, FILE, endpoint=hub.url, local_dir=tmp_path / "l", token=False)
    assert Path(local) == tmp_path / "l" / FILE and Path(local).read_bytes() == DATA


def test_hf_resumes_with_range_after_dropped_connection(hub, tmp_path):
    """http_get retries in-process (5 times, 1 s apart) with `Range: bytes=N-`, but N only counts whole
    DOWNLOAD_CHUNK_SIZE (10 MiB) chunks: httpx2's iter_bytes buffers a chunk, and a partial one is lost."""
    from huggingface_hub import constants, hf_hub_download

    big = bytes(range(256)) * (100 * 1024)  # 25 MiB
    hub.add_file(REPO, "big.gguf", big)
    hub.cut_after(REPO, "big.gguf", 15 * 2**20)
    path = hf_hub_download(REPO, "big.gguf", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == big
    got = gets(hub, "/resolve/main/big.gguf")
    assert len(got) == 2 and "range" not in got[0]
    assert got[1]["range"] == f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-" == "bytes=10485760-"

    # A cut inside the first chunk: the retry starts over without a Range header.
    hub.cut_after(REPO, FILE, 100_000)
    path = hf_hub_download(REPO, FILE, endpoint=hub.url, cache_dir=tmp_path / "2", token=False)
    assert Path(path).read_bytes() == DATA
    assert [h.get("range") for h in gets(hub, f"/resolve/main/{FILE}")] == [None, None]


def test_hf_does_not_verify_sha256(hub, tmp_path):
    """huggingface_hub only checks the size: a wrong advertised sha256 goes unnoticed, the caller must verify."""
    from huggingface_hub import HfApi, hf_hub_download

    hub.corrupt_sha(REPO, FILE)
    advertised = {s.rfilename: s for s in HfApi(endpoint=hub.url).model_info(REPO, files_metadata=True).siblings}
    assert advertised[FILE].lfs.sha256 != SHA
    path = hf_hub_download(REPO, FILE, endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == SHA  # served bytes, accepted without complaint


def test_hf_not_found_errors(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", FILE, endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RemoteEntryNotFoundError) as e:
        hf_hub_download(REPO, "nope.gguf", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert isinstance(e.value, EntryNotFoundError) and e.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, FILE, revision="v9", endpoint=hub.url, cache_dir=tmp_path, token=False)


def test_hf_token_required(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub.require_token(REPO, TOKEN)
    # No token: 401 that the client reports like a missing repo (the Hub hides private repos).
    with pytest.raises(RepositoryNotFoundError) as e:
        hf_hub_download(REPO, FILE, endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert e.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    # Wrong token: plain HfHubHTTPError 401.
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download(REPO, FILE, endpoint=hub.url, cache_dir=tmp_path, token="hf_wrong")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)
    # Right token: sent as a Bearer header on the HEAD and the GET.
    path = hf_hub_download(REPO, FILE, endpoint=hub.url, cache_dir=tmp_path, token=TOKEN)
    assert Path(path).read_bytes() == DATA
    assert gets(hub, "/resolve/")[-1]["authorization"] == f"Bearer {TOKEN}"
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO).id == REPO


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def test_hf_network_error(tmp_path, monkeypatch):
    import time
    import types

    import httpx2
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import _http

    # hf_hub_download retries an unreachable endpoint with back-off before giving up; record the sleeps, skip them.
    sleeps: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(time=time.time, monotonic=time.monotonic,
                                                             sleep=sleeps.append))
    url = _dead_url()
    # The download falls back to the cache, then reports the connection problem as a missing local entry.
    with pytest.raises(LocalEntryNotFoundError) as e:
        hf_hub_download(REPO, FILE, endpoint=url, cache_dir=tmp_path, token=False)
    assert isinstance(e.value.__cause__, httpx2.ConnectError)
    assert sleeps == [1, 2, 4, 8, 8]  # 23 s of real waiting
    # The API calls do not retry.
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=url, token=False).model_info(REPO)


# -- ModelScope --------------------------------------------------------------------------------------------------------


def test_ms_listing(hub):
    from modelscope.hub.api import HubApi
    from modelscope_hub import HubApi as NewHubApi

    # The legacy facade keeps only Path and Size ...
    files = HubApi(endpoint=hub.url).get_model_files(REPO, revision="master", recursive=True)
    assert {f["Path"]: f["Size"] for f in files} == {FILE: len(DATA), "sub/readme.txt": 5}
    # ... the modelscope_hub API it wraps also has the sha256.
    infos = NewHubApi(endpoint=hub.url).list_repo_files(REPO, "model", revision="master")
    assert {(i.path, i.size, i.sha256) for i in infos if i.path == FILE} == {(FILE, len(DATA), SHA)}


def test_ms_download(hub, tmp_path):
    from modelscope.hub.file_download import model_file_download

    path = model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert Path(path) == tmp_path / "models" / "org--tiny-GGUF" / "snapshots" / "master" / FILE
    assert Path(path).read_bytes() == DATA
    local = model_file_download(REPO, "sub/readme.txt", revision="master", endpoint=hub.url,
                                local_dir=str(tmp_path / "l"))
    assert Path(local) == tmp_path / "l" / "sub" / "readme.txt" and Path(local).read_bytes() == b"hello"


def test_ms_resumes_with_range_after_dropped_connection(hub, tmp_path):
    from modelscope.hub.file_download import model_file_download

    hub.cut_after(REPO, FILE, 100_000)
    path = model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == DATA
    got = gets(hub, "FilePath=")
    assert len(got) == 2 and "range" not in got[0]
    assert got[1]["range"] == "bytes=100000-"


def test_ms_resumes_partial_file_left_by_earlier_process(hub, tmp_path):
    """The partial file is `<target>.incomplete` and survives the process, so a later run continues it."""
    from modelscope.hub.file_download import model_file_download

    target = tmp_path / "models" / "org--tiny-GGUF" / "snapshots" / "master" / FILE
    target.parent.mkdir(parents=True)
    target.with_name(FILE + ".incomplete").write_bytes(DATA[:50_000])
    path = model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == DATA
    assert [h.get("range") for h in gets(hub, "FilePath=")] == ["bytes=50000-"]
    assert not target.with_name(FILE + ".incomplete").exists()


def test_ms_verifies_sha256_from_linked_etag(hub, tmp_path):
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import FileIntegrityError

    hub.corrupt_sha(REPO, FILE)
    with pytest.raises(FileIntegrityError):  # after 3 attempts (1 s + 2 s back-off)
        model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert len(gets(hub, "FilePath=")) == 3
    assert not list(tmp_path.rglob(FILE + "*"))  # neither the file nor a partial is left behind


def test_ms_without_linked_etag_does_not_verify(tmp_path):
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub import HubApi as NewHubApi

    with FakeHub(ms_linked_etag=False) as hub:
        hub.add_file(REPO, FILE, DATA)
        hub.corrupt_sha(REPO, FILE)
        listed = NewHubApi(endpoint=hub.url).list_repo_files(REPO, "model", revision="master")
        assert listed[0].sha256 != SHA
        path = model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
        assert Path(path).read_bytes() == DATA


def test_ms_not_found_errors(hub, tmp_path):
    from modelscope.hub.api import HubApi
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import NotExistError

    with pytest.raises(NotExistError):
        HubApi(endpoint=hub.url).get_model_files("org/missing", revision="master")
    hub.add_file("org/hf-only", FILE, b"x", hubs=("hf",))  # a repo that exists on one hub only
    with pytest.raises(NotExistError):
        HubApi(endpoint=hub.url).get_model_files("org/hf-only", revision="master")
    # model_file_download turns NotExistError/AuthenticationError into requests.HTTPError (cause kept).
    with pytest.raises(requests.HTTPError) as e:
        model_file_download("org/missing", FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert isinstance(e.value.__cause__, NotExistError) and e.value.response.status_code == 404
    with pytest.raises(requests.HTTPError) as e:
        model_file_download(REPO, "nope.gguf", revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert isinstance(e.value.__cause__, NotExistError)


def test_ms_token_required(hub, tmp_path, monkeypatch):
    from modelscope.hub.api import HubApi
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import AuthenticationError

    hub.require_token(REPO, TOKEN)
    with pytest.raises(AuthenticationError):
        HubApi(endpoint=hub.url).get_model_files(REPO, revision="master")
    with pytest.raises(requests.HTTPError) as e:
        model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path))
    assert isinstance(e.value.__cause__, AuthenticationError) and e.value.response.status_code == 401

    assert len(HubApi(endpoint=hub.url, token=TOKEN).get_model_files(REPO, revision="master")) == 2
    path = model_file_download(REPO, FILE, revision="master", endpoint=hub.url, cache_dir=str(tmp_path),
                               token=TOKEN)
    assert Path(path).read_bytes() == DATA
    last = gets(hub, "FilePath=")[-1]
    assert last["authorization"] == f"Bearer {TOKEN}" and f"m_session_id={TOKEN}" in last["cookie"]

    # The token can also come from MODELSCOPE_API_TOKEN (read when the default config is built).
    import modelscope_hub.config

    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    assert len(HubApi(endpoint=hub.url).get_model_files(REPO, revision="master")) == 2


# -- Endpoint environment variables ------------------------------------------------------------------------------------


def test_endpoint_env_vars_in_fresh_process(hub, tmp_path):
    """HF_ENDPOINT is read when huggingface_hub is imported, MODELSCOPE_ENDPOINT when modelscope_hub first builds its
    default config: set both before the import / first use, here in a fresh interpreter."""
    script = textwrap.dedent(f"""
        from huggingface_hub import HfApi, hf_hub_download
        from modelscope.hub.api import HubApi
        from modelscope.hub.file_download import model_file_download
        assert len(HfApi().model_info({REPO!r}, files_metadata=True).siblings) == 2
        p = hf_hub_download({REPO!r}, {FILE!r}, cache_dir={str(tmp_path / 'hf')!r})
        assert open(p, 'rb').read() == bytes(range(256)) * 1200
        assert len(HubApi().get_model_files({REPO!r})) == 2
        # revision=None: the legacy wrapper first resolves it via /revisions (-> master)
        p = model_file_download({REPO!r}, {FILE!r}, cache_dir={str(tmp_path / 'ms')!r})
        assert open(p, 'rb').read() == bytes(range(256)) * 1200
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "MODELSCOPE_ENDPOINT": hub.url}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any("/revisions" in p for _, p, _ in hub.requests)
