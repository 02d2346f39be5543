"""`ggufchat download https://…/model.gguf`: a plain web server, so the HTTP is ours (requests, streaming).

    <staging>/<file>.part        the bytes so far; the next run asks for the rest with `Range: bytes=N-`
    <staging>/<file>.part.json   the URL and the server's validator (ETag or Last-Modified) for that .part

A resumed request carries `If-Range: <validator>`, so a server whose file changed answers with the whole new file
(200) instead of the tail of another one; a 206 whose validator or start differs from ours, or a server that ignores
Range (200), starts the file over. Finished files are checked (sha256 when one was given, GGUF header always) and
installed with the same atomic move and manifest as hub downloads.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ggufchat import __version__
from ggufchat.errors import DownloadError, InvalidModelFile
from ggufchat.models.catalog import ModelRef, split_info, split_names
from ggufchat.models.gguf import read_gguf
from ggufchat.models.store import CachedModel, FileRecord, Manifest, Store, sha256_file, slug

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRIES = 5  # attempts in a row that receive nothing before giving up (any progress resets the count)
RETRY_WAIT = 1.0  # seconds between attempts
TIMEOUT = (15, 60)  # connect, read
DISK_MARGIN = 64 << 20


class _StartOver(Exception):
    """The .part cannot be continued (the file changed, or the server answered another range): drop it."""


class _Transient(Exception):
    """Worth another try from what arrived: a body that ended early, or a server error that may pass."""


_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def _free_bytes(path: Path) -> int:
    # Looked up through the hub module so tests can shrink the disk in one place.
    from ggufchat.models import hub

    return hub.free_bytes(path)


def _public(url: str) -> str:
    """The URL without query or fragment, for messages and names (a query may carry a signature or a token)."""
    return url.split("#")[0].split("?")[0]


def _sibling(url: str, filename: str) -> str:
    """The URL of another file in the same folder, with the same query (e.g. ?download=true)."""
    parts = urlsplit(url)
    folder = parts.path.rsplit("/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, f"{folder}/{filename}", parts.query, ""))


def _drop(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict:
    try:
        return json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _progress(name: str, total: int | None, initial: int):
    from tqdm import tqdm

    # Same bar as the hub clients' (tqdm on stderr): size, speed, time left.
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, dynamic_ncols=True)


def _http_error(status: int, url: str) -> DownloadError:
    where = _public(url)
    if status == 404:
        return DownloadError(f"{where} was not found (HTTP 404)",
                             hint="Check the URL; copy the download link of the file, not of its web page.")
    if status in (401, 403):
        return DownloadError(f"{where}: the server refused access (HTTP {status})",
                             hint="Download it with your credentials and pass the file's path instead.")
    return DownloadError(f"{where}: the server answered HTTP {status}", hint="Check the URL.")


def fetch(url: str, part: Path, name: str) -> Path:
    """Download `url` into `part`, continuing whatever an earlier run left there; return `part` when complete."""
    import requests

    part.parent.mkdir(parents=True, exist_ok=True)
    meta = _read_meta(part)
    if part.exists() and meta.get("url") != url:
        _drop(part)  # left by another URL that happens to share the file name
        meta = {}
    with requests.Session() as session:
        session.headers["User-Agent"] = f"ggufchat/{__version__}"
        return _fetch(session, url, part, name, meta)


def _fetch(session, url: str, part: Path, name: str, meta: dict) -> Path:
    import requests

    failures = restarts = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # the size on the wire is the size on disk
        if have:
            headers["Range"] = f"bytes={have}-"
            if meta.get("validator"):
                headers["If-Range"] = meta["validator"]
        try:
            with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as resp:
                meta = _receive(resp, url, part, name, have, meta)
            return part
        except _StartOver as exc:
            restarts += 1
            if restarts > 3:
                raise DownloadError(f"{name}: the server keeps answering with the wrong bytes ({exc})") from exc
            log.warning("%s: %s; starting over", name, exc)
            _drop(part)
            meta = {}
        # A body cut short surfaces as ChunkedEncodingError (urllib3's IncompleteRead), even when not chunked.
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Transient) as exc:
            now = part.stat().st_size if part.exists() else 0
            failures = 0 if now > have else failures + 1
            host = urlsplit(url).netloc
            if failures > RETRIES and not now:
                raise DownloadError(f"{name}: cannot download from {host} ({_reason(exc)})",
                                    hint="Check the URL and the network, then try again.") from exc
            if failures > RETRIES:
                raise DownloadError(f"{name}: the connection to {host} kept failing ({_reason(exc)}); "
                                    f"{now} bytes are kept",
                                    hint="Run the same command again: it continues where it stopped.") from exc
            log.warning("%s: %s; trying again from byte %d", name, _reason(exc), now)
            time.sleep(RETRY_WAIT)


def _reason(exc: Exception) -> str:
    """The useful end of a requests/urllib3 error ("[Errno 111] Connection refused"), not its whole chain."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return m[0] if m else text[:200]


def _receive(resp, url: str, part: Path, name: str, have: int, meta: dict) -> dict:
    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    if resp.status_code == 416 and have:
        # Nothing past what we hold: complete if the server's size is ours, stale otherwise.
        m = re.fullmatch(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
        if m and int(m[1]) == have and meta.get("size") == have:
            return meta
        raise _StartOver("the server has no bytes past the partial file")
    if resp.status_code in _TRANSIENT_STATUS:
        raise _Transient(f"the server answered HTTP {resp.status_code}")
    if resp.status_code >= 400:
        raise _http_error(resp.status_code, url)
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if resp.status_code == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m[1]) != have:
            raise _StartOver(f"asked for bytes {have}-, got {resp.headers.get('Content-Range')!r}")
        offset = have
        total = int(m[3]) if m[3] != "*" else None
        if (meta.get("validator") and validator and validator != meta["validator"]) or \
                meta.get("size") not in (None, total):
            raise _StartOver("the file changed on the server")
    else:
        if have:
            log.warning("%s: the server sent the whole file instead of the rest (it ignores Range, or the file "
                        "changed); starting over", name)
        offset, total = 0, length
    if total is not None and total - offset + DISK_MARGIN > (free := _free_bytes(part.parent)):
        raise DownloadError(f"{name} needs {(total - offset) / 2**30:.2f} GiB more but {part.parent} has "
                            f"{free / 2**30:.2f} GiB free",
                            hint="Free some space, or point GGUFCHAT_HOME at a bigger disk.")
    meta = {"url": url, "validator": validator, "size": total}
    _meta_path(part).write_text(json.dumps(meta), encoding="utf-8")
    received = 0
    with open(part, "ab" if offset else "wb") as fh, _progress(name, total, offset) as bar:
        for chunk in resp.iter_content(CHUNK):
            fh.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    size = offset + received
    if total is not None and size < total:
        raise _Transient(f"the body ended after {size} of {total} bytes")
    if total is not None and size > total:
        raise _StartOver(f"the server sent {size} bytes for a {total}-byte file")
    return meta


def download_url(ref: ModelRef, store: Store, *, sha256: str | None,
                 report: Callable[[str], None]) -> CachedModel:
    """Fetch a .gguf URL (every part of a split model), verify, and install it under the name ref.display."""
    url, name = ref.url or "", ref.display
    filename = ref.filename or ""
    split = split_info(filename)
    if split:
        count = split[2]
        names = split_names(filename)
        if sha256:
            raise DownloadError(f"{name} is one part of a {count}-part model; a single sha256 cannot check them all",
                                hint="Drop --sha256 / #sha256= for split models.")
    else:
        names = [filename]
    staging = store.downloads_dir / "url" / slug(name)
    report(f"downloading {', '.join(names)} from {_public(_sibling(url, ''))}")
    parts = {n: fetch(_sibling(url, n), staging / f"{n}.part", n) for n in names}
    records = []
    for n, path in parts.items():
        got = sha256_file(path)
        if sha256 and got != sha256:
            _drop(path)
            shutil.rmtree(staging, ignore_errors=True)
            raise DownloadError(f"{n} from {_public(url)} failed its checksum (sha256 {got[:12]}..., expected "
                                f"{sha256[:12]}...); the file was deleted",
                                hint="Check the sha256 you gave; if it is right, the server's copy is not that file.")
        try:
            read_gguf(path)
        except InvalidModelFile as exc:
            _drop(path)
            raise DownloadError(f"{_public(_sibling(url, n))} did not give a GGUF file "
                                f"({str(exc).replace(path.name, n)}); it was deleted",
                                hint="Check that the URL is the file's download link.") from exc
        records.append(FileRecord(n, path.stat().st_size, got))
    manifest = Manifest(name, "url", _public(_sibling(url, "")), None, records, verified=bool(sha256))
    model = store.install(manifest, parts)
    shutil.rmtree(staging, ignore_errors=True)
    report(f"saved {name}: {model.path}")
    return model
