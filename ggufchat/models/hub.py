"""`ggufchat download`: list a repo and fetch GGUF files through the hub clients, then verify and install.

The HTTP is the clients' own (huggingface_hub, modelscope): we pick files, check disk space, hash
what arrived against the hub's sha256 (huggingface_hub checks sizes only), check the GGUF header, and
only then move the files into the model cache with the manifest written last. Plain .gguf URLs are
fetched by ggufchat.models.direct instead.

Resuming across runs: modelscope keeps `<file>.incomplete` in its local_dir after a failure or Ctrl-C and
continues it with a Range request next time, so its staging folder simply stays. huggingface_hub 2.x
does not: hf_hub_download writes to a per-process `<etag>.<uuid>.incomplete` and deletes it in a
`finally` (retrying with Range only within the call), so a run that dies loses everything. For Hugging
Face we therefore take the file's metadata and its HTTP transfer from huggingface_hub (get_hf_file_metadata,
http_get: the same headers, auth, redirects, retries and progress bar) but keep the partial file ourselves,
as `<file>.<etag>.part` in the staging folder, and hand http_get its size to resume from.

One process per model: two runs downloading the same model (`download` twice, or `chat --pull`) would append to
one partial file and delete each other's staging folder. So `download` holds a file lock named for the model
(Store.lock_path) from finding it missing until it is installed; a second run says it waits, then finds the model
installed, or, if the first run failed, continues from what that run kept. Each model stages in a folder of its own,
so different models, even from one repo, never wait for or touch each other. The lock is an flock on an empty file:
a process that dies holds nothing, and the file it leaves behind is harmless.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ggufchat.errors import DownloadError, GgufchatError
from ggufchat.models.catalog import CATALOG, ModelRef, parse_spec, pick_files, split_info, split_names
from ggufchat.models.gguf import read_gguf
from ggufchat.models.store import CachedModel, FileRecord, Manifest, Store, sha256_file, slug
from ggufchat.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MS_ENDPOINT = "https://www.modelscope.cn"
_DISK_MARGIN = 64 << 20
STILL_WAITING = 60.0  # seconds between lines saying we still wait for another process's download


@dataclass
class RemoteFile:
    name: str
    size: int
    sha256: str | None


class _NotThere(DownloadError):
    """Not found on this hub (another hub may have it)."""


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------- Hugging Face
def _hf_call(fn: Callable, what: str):
    from huggingface_hub import errors as hf_errors

    try:
        return fn()
    except hf_errors.RevisionNotFoundError as exc:
        raise _NotThere(f"{what}: no such revision on Hugging Face") from exc
    except (hf_errors.RepositoryNotFoundError, hf_errors.HfHubHTTPError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise DownloadError(f"{what}: Hugging Face refused access ({status})",
                                hint="Set HF_TOKEN or pass --token-file with a token that can read this repo.") from exc
        if isinstance(exc, hf_errors.RepositoryNotFoundError) or status == 404:
            raise _NotThere(f"{what}: not found on Hugging Face") from exc
        raise DownloadError(f"{what}: Hugging Face answered {status}: {exc}") from exc
    except OSError as exc:  # network errors (httpx's are OSErrors too), or a consistency check failure
        raise _NotThere(f"{what}: cannot download from Hugging Face ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        if "ConnectError" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            raise _NotThere(f"{what}: cannot reach Hugging Face ({exc})") from exc
        raise


def _hf_list(repo: str, revision: str, token: str | None, endpoint: str | None) -> list[RemoteFile]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    info = _hf_call(lambda: api.model_info(repo, revision=revision, files_metadata=True), f"hf://{repo}")
    return [RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]


def _hf_fetch(repo: str, name: str, revision: str, token: str | None, endpoint: str | None, staging: Path) -> Path:
    """Download one file to staging/name, continuing a .part an earlier run left (see the module docstring)."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    what = f"hf://{repo}/{name}"
    url = hf_hub_url(repo, name, revision=revision, endpoint=endpoint)
    meta = _hf_call(lambda: get_hf_file_metadata(url, token=token, endpoint=endpoint), what)
    final = staging / name
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file() and meta.size is not None and final.stat().st_size == meta.size:
        return final  # completed by an earlier run that stopped before installing; the checksum still decides
    # The etag (the sha256 of an LFS file) names the part, so a file changed on the hub never continues an old one.
    part = final.with_name(f"{final.name}.{re.sub(r'[^0-9A-Za-z]', '', meta.etag or '')[:16] or 'noetag'}.part")
    for stale in glob.glob(glob.escape(str(final)) + ".*.part"):
        if Path(stale) != part:
            Path(stale).unlink(missing_ok=True)
    if meta.size is not None and part.exists() and part.stat().st_size > meta.size:
        part.unlink()
    headers = build_hf_headers(token=token)
    # As hf_hub_download does: fetch the redirect target directly (a signed CDN URL gets no Authorization);
    # Xet-backed files are fetched from the resolve URL, which the Hub redirects to its plain-HTTP bridge.
    location = url if meta.xet_file_data is not None else meta.location
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)
    with open(part, "r+b" if part.exists() else "wb") as fh:
        fh.seek(0, os.SEEK_END)
        try:
            _hf_call(lambda: http_get(location, fh, resume_size=fh.tell(), headers=headers, expected_size=meta.size,
                                      displayed_filename=name), what)
        except (httpx2.HTTPError, _NotThere) as exc:
            fh.flush()
            kept = part.stat().st_size
            raise DownloadError(f"{what}: the download was cut short ({exc.__cause__ or exc}); "
                                f"{kept} of {meta.size or '?'} bytes are kept",
                                hint="Run the same command again: it continues where it stopped.") from exc
    os.replace(part, final)
    return final


# ---------------------------------------------------------------- ModelScope
def _ms_prepare(settings: Settings) -> None:
    # modelscope writes a session file under MODELSCOPE_HOME on first use; keep it inside our cache.
    os.environ.setdefault("MODELSCOPE_HOME", str(settings.home / "modelscope"))


def _ms_call(fn: Callable, what: str):
    import requests
    from modelscope_hub import errors as ms_errors

    try:
        return fn()
    except (ms_errors.NotExistError, ms_errors.NotFoundError) as exc:
        raise _NotThere(f"{what}: not found on ModelScope") from exc
    except (ms_errors.AuthenticationError, ms_errors.PermissionDeniedError) as exc:
        raise DownloadError(f"{what}: ModelScope refused access",
                            hint="Set MODELSCOPE_API_TOKEN or pass --token-file.") from exc
    except ms_errors.FileIntegrityError as exc:
        raise DownloadError(f"{what}: the file from ModelScope failed its checksum") from exc
    except requests.HTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise DownloadError(f"{what}: ModelScope refused access ({status})",
                                hint="Set MODELSCOPE_API_TOKEN or pass --token-file.") from exc
        if status == 404:
            raise _NotThere(f"{what}: not found on ModelScope") from exc
        raise DownloadError(f"{what}: ModelScope answered {status}") from exc
    except OSError as exc:
        raise _NotThere(f"{what}: cannot reach ModelScope ({type(exc).__name__}: {exc})") from exc


def _ms_list(repo: str, revision: str, token: str | None, endpoint: str) -> list[RemoteFile]:
    import modelscope_hub

    api = modelscope_hub.HubApi(endpoint=endpoint, token=token)
    files = _ms_call(lambda: api.list_repo_files(repo, "model", revision=revision), f"ms://{repo}")
    return [RemoteFile(f.path, f.size or 0, f.sha256 or None) for f in files if not f.is_dir]


def _ms_fetch(repo: str, name: str, revision: str, token: str | None, endpoint: str, staging: Path) -> Path:
    from modelscope.hub.file_download import model_file_download

    return Path(_ms_call(lambda: model_file_download(repo, name, revision=revision, endpoint=endpoint,
                                                     local_dir=str(staging), token=token), f"ms://{repo}/{name}"))


# ---------------------------------------------------------------- the verb
def _sources(ref: ModelRef, source: str) -> list[tuple[str, str]]:
    """(hub, repo) pairs to try, in order."""
    if ref.kind in ("hf", "ms"):
        if source not in ("auto", ref.kind):
            raise DownloadError(f"{ref.display} names a {ref.kind} repo; --source {source} contradicts it")
        return [(ref.kind, ref.repo)]
    entry = CATALOG[ref.repo]
    pairs = [("hf", entry.hf_repo)] + ([("ms", entry.ms_repo)] if entry.ms_repo else [])
    if source != "auto":
        pairs = [p for p in pairs if p[0] == source]
        if not pairs:
            raise DownloadError(f"{ref.repo} has no {source} repo in the catalog")
    return pairs


def download(spec: str, settings: Settings, *, source: str = "auto", revision: str | None = None,
             token: str | None = None, sha256: str | None = None,
             report: Callable[[str], None] = lambda _: None) -> CachedModel:
    """Download a model into the cache (or return it if it is there already).

    `sha256` (or a URL's #sha256=HEX) is checked on top of the hub's own; it fits single-file models only.
    """
    if source not in ("auto", "hf", "ms"):
        raise DownloadError(f"--source must be hf, ms or auto, not {source!r}")
    ref = parse_spec(spec)
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
            raise DownloadError(f"--sha256 must be 64 hex digits, not {sha256!r}")
        sha256 = sha256.strip().lower()
        if ref.sha256 and ref.sha256 != sha256:
            raise DownloadError("--sha256 and the URL's #sha256= disagree")
    sha256 = sha256 or ref.sha256
    if ref.revision and revision and ref.revision != revision:
        raise DownloadError(f"the URL names revision {ref.revision} but --revision says {revision}")
    revision = revision or ref.revision
    if ref.kind == "url" and source != "auto":
        raise DownloadError(f"{ref.display} is fetched from its own server; --source {source} does not apply")
    name = ref.display
    store = Store(settings.home)
    if (cached := _cached(store, name, report)) is not None:
        return cached
    if settings.offline:
        raise DownloadError(f"{name} is not in the cache and GGUFCHAT_OFFLINE is set",
                            hint="Unset GGUFCHAT_OFFLINE (or drop --offline) to download it.")
    with _one_process_per_model(store, name, report):
        if (cached := _cached(store, name, report)) is not None:  # installed by the run we waited for
            return cached
        if ref.kind == "url":
            from ggufchat.models.direct import download_url

            return download_url(ref, store, sha256=sha256, report=report)
        failures = []
        for hub, repo in _sources(ref, source):
            try:
                return _download_from(hub, repo, ref, name, settings, store, revision, token, sha256, report)
            except _NotThere as exc:
                failures.append(str(exc))
                report(f"{exc}")
        raise DownloadError("; ".join(failures))


def _cached(store: Store, name: str, report: Callable[[str], None]) -> CachedModel | None:
    cached = store.find(name)
    if cached is not None:
        report(f"{name} is already downloaded: {cached.path}")
    return cached


@contextmanager
def _one_process_per_model(store: Store, name: str, report: Callable[[str], None]) -> Iterator[None]:
    """Hold the model's download lock, waiting (and saying so) while another process holds it."""
    from filelock import FileLock, Timeout

    path = store.lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report(f"Waiting for another ggufchat download of {name} to finish (lock: {path})")
        waited = 0.0
        while True:
            try:
                lock.acquire(timeout=STILL_WAITING)
                break
            except Timeout:  # a big model takes a while: show we are alive, not hung
                waited += STILL_WAITING
                report(f"still waiting for the other download of {name} ({waited / 60:.0f} min so far)")
    try:
        yield
    finally:
        lock.release()


def _download_from(hub: str, repo: str, ref: ModelRef, name: str, settings: Settings, store: Store,
                   revision: str | None, token: str | None, sha256: str | None,
                   report: Callable[[str], None]) -> CachedModel:
    if hub == "hf":
        rev = revision or "main"
        listing = _hf_list(repo, rev, token, settings.hf_endpoint)
    else:
        _ms_prepare(settings)
        rev = revision or "master"
        endpoint = settings.ms_endpoint or DEFAULT_MS_ENDPOINT  # ms_endpoint also reads MODELSCOPE_ENDPOINT
        listing = _ms_list(repo, rev, token, endpoint)
    by_name = {f.name: f for f in listing}
    where = f"{hub}://{repo}"
    if ref.filename:
        if ref.filename not in by_name:
            raise _NotThere(f"{where} has no file {ref.filename}")
        names = [ref.filename]
        if split_info(ref.filename):  # one part named (as in a URL): the model is all of them
            names = split_names(ref.filename)
            if missing := [n for n in names if n not in by_name]:
                raise DownloadError(f"{where} lacks part(s) {', '.join(missing)} of {ref.filename}")
    else:
        try:
            names = pick_files(list(by_name), ref.quant, where)
        except GgufchatError as exc:
            raise DownloadError(str(exc), hint=exc.hint) from exc
    files = [by_name[n] for n in names]
    if sha256 and len(files) > 1:
        raise DownloadError(f"{name} is a {len(files)}-part model; a single sha256 cannot check them all",
                            hint="Drop --sha256 / #sha256= for split models.")
    need = sum(f.size for f in files)
    # Per model, not per repo: the lock is per model, so two models of one repo must not share (or remove) a folder.
    staging = store.downloads_dir / hub / slug(f"{name}@{rev}")
    # What an earlier run left in staging (partial files) is already on the disk.
    kept = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.is_dir() else 0
    free = free_bytes(settings.home)
    if need - min(kept, need) + _DISK_MARGIN > free:
        raise DownloadError(f"{name} needs {need / 2**30:.2f} GiB but {settings.home} has {free / 2**30:.2f} GiB free",
                            hint="Free some space, or point GGUFCHAT_HOME at a bigger disk.")
    staging.mkdir(parents=True, exist_ok=True)
    report(f"downloading {', '.join(names)} ({need / 2**20:.1f} MiB) from {where}")
    staged: dict[str, Path] = {}
    for f in files:
        if hub == "hf":
            path = _hf_fetch(repo, f.name, rev, token, settings.hf_endpoint, staging)
        else:
            path = _ms_fetch(repo, f.name, rev, token, endpoint, staging)
        staged[f.name] = path
        if f.sha256 or sha256:
            got = sha256_file(path)
            if f.sha256 and got != f.sha256:
                path.unlink(missing_ok=True)
                raise DownloadError(f"{f.name} from {where} failed its checksum (sha256 {got[:12]}..., "
                                    f"the hub says {f.sha256[:12]}...); the file was deleted",
                                    hint="Run the download again; if it keeps failing the hub copy is broken.")
            if sha256 and got != sha256:
                path.unlink(missing_ok=True)
                raise DownloadError(f"{f.name} from {where} failed its checksum (sha256 {got[:12]}..., "
                                    f"expected {sha256[:12]}...); the file was deleted",
                                    hint="Check the sha256 you gave.")
    read_gguf(staged[names[0]])  # a complete GGUF, or InvalidModelFile
    manifest = Manifest(name, hub, repo, rev, [FileRecord(f.name, f.size or staged[f.name].stat().st_size,
                                                          f.sha256 or sha256) for f in files],
                        verified=all(f.sha256 or sha256 for f in files))
    model = store.install(manifest, staged)
    shutil.rmtree(staging, ignore_errors=True)
    report(f"saved {name}: {model.path}")
    return model
