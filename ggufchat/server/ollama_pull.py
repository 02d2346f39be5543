"""/api/pull: `ggufchat download` (models/hub.py, the same cache, locks and verification) on a thread,
its progress turned into Ollama's status lines.

    {"status": "pulling manifest"}
    {"status": "downloading m-q4_1.gguf (92.0 MiB) from hf://org/repo"}     ggufchat's own report lines
    {"status": "pulling m-q4_1.gguf", "digest": "m-q4_1.gguf", "total": N, "completed": n}   every ~0.25 s
    {"status": "success"}

The bytes so far are the sizes of the files in the model's staging folder under GGUFCHAT_HOME/downloads
(models/store.py), so a resumed download starts where the last one stopped. `digest` names the file(s):
the hub's sha256 is known only once the file is verified (then it is the digest of the last progress
line). A client that goes away does not stop the download: it finishes in the background, and a pull
made meanwhile waits for it (the download lock) and then finds the model installed.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

from ggufchat.errors import InvalidParameter
from ggufchat.models.catalog import parse_spec
from ggufchat.models.store import CachedModel, Store, slug
from ggufchat.settings import Settings

POLL = 0.25  # seconds between progress lines
_SIZE = re.compile(r"^downloading (?P<files>.+) \((?P<mib>\d+(?:\.\d+)?) MiB\) from ")
_OLLAMA_HF = re.compile(r"^(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>[^/:]+/[^/:]+)(?::(?P<tag>[^/]+))?$")


def spec_of(name: str) -> str:
    """The ggufchat spec for a name an Ollama client sends: Ollama's `hf.co/OWNER/REPO[:QUANT]` is
    ggufchat's `hf://OWNER/REPO[:QUANT]` (`:latest`, Ollama's default tag, picks the only quant);
    anything else is a ggufchat spec as `ggufchat download` takes it. Checked here: a bad name is a 400
    before any line is streamed."""
    text = name.strip()
    if m := _OLLAMA_HF.match(text):
        tag = m["tag"]
        text = f"hf://{m['repo']}" + (f":{tag}" if tag and tag.lower() != "latest" else "")
    if not text:
        raise InvalidParameter("model is required", param="model")
    parse_spec(text)
    return text


def _tree_bytes(folder: str) -> int:
    """Bytes of the files under `folder`, metadata (.json) aside. The download installs its files by
    moving them out and then removes the folder, so anything may vanish while it is read: what vanished
    counts as nothing (the caller never lets progress go backwards)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(entry.path)
            elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(".json"):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _staging_bytes(store: Store, name: str) -> int:
    """Bytes in the staging folders of model `name` (hub downloads: <hub>/<slug of name@revision>;
    URL downloads: url/<slug of name>)."""
    readable = slug(name).rsplit("-", 1)[0][:79]
    total = 0
    try:
        hub_dirs = [d for d in os.scandir(store.downloads_dir) if d.name != "locks" and d.is_dir()]
    except OSError:
        return 0
    for hub_dir in hub_dirs:
        try:
            folders = list(os.scandir(hub_dir.path))
        except OSError:
            continue
        for folder in folders:
            rest = folder.name[len(readable):]
            if folder.name.startswith(readable) and rest[:1] in ("_", "-"):
                total += _tree_bytes(folder.path)
    return total


async def pull(spec: str, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Ollama's status objects for one download, ending with {"status": "success"}; a failure raises
    (DownloadError, ...) after the lines so far."""
    from ggufchat.models.hub import download

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    store = Store(settings.home)
    name = parse_spec(spec).display

    def report(line: str) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("line", line))

    def work() -> None:
        try:
            model = download(spec, settings, report=report)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, raised there
            loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(events.put_nowait, ("done", model))

    yield {"status": "pulling manifest"}
    # A thread of its own: a download takes minutes, and must not hold one of the server's shared threads.
    threading.Thread(target=work, name="ggufchat-pull", daemon=True).start()
    files, total, last = None, None, -1
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), POLL)
        except asyncio.TimeoutError:
            kind, value = "tick", None
        if kind == "line":
            yield {"status": value}
            if m := _SIZE.match(value):
                files, total = m["files"], int(float(m["mib"]) * 2**20)
        elif kind == "error":
            raise value
        elif kind == "done":
            model: CachedModel = value
            sha = model.manifest.files[0].sha256 if len(model.manifest.files) == 1 else None
            if files is not None:
                yield {"status": f"pulling {files}", "digest": f"sha256:{sha}" if sha else files,
                       "total": model.size, "completed": model.size}
            yield {"status": "success"}
            return
        if total is not None:
            # Never backwards: the files leave the staging folder when they are installed.
            done = max(last, min(total, await asyncio.to_thread(_staging_bytes, store, name)))
            if done != last:
                last = done
                yield {"status": f"pulling {files}", "digest": files, "total": total, "completed": done}
