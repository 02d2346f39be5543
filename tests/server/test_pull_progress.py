"""The bytes /api/pull reports while a download runs are read from a staging folder that the download
itself empties and removes when it installs the model: reading it must never fail a pull that
succeeded (CI once saw a 500 "internal server error" at the very end of a good download)."""

from __future__ import annotations

import shutil
import threading

from ggufchat.models.store import Store, slug
from ggufchat.server.ollama_pull import _staging_bytes

NAME = "hf://org/tiny-GGUF:q4_1"


def _stage(store: Store, sizes: dict[str, int]):
    folder = store.downloads_dir / "hf" / slug(f"{NAME}@main")
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for rel, size in sizes.items():
        (folder / rel).write_bytes(b"x" * size)
    return folder


def test_counts_the_model_files_in_staging_and_nothing_else(tmp_path):
    store = Store(tmp_path)
    assert _staging_bytes(store, NAME) == 0  # no downloads folder yet
    _stage(store, {"a.gguf.part": 1000, "sub/b.gguf": 24, "meta.json": 50})
    other = store.downloads_dir / "hf" / slug("hf://org/other-GGUF:q4_1@main")
    other.mkdir(parents=True)
    (other / "c.gguf").write_bytes(b"y" * 7)
    (store.downloads_dir / "locks").mkdir()
    (store.downloads_dir / "locks" / "x.lock").write_bytes(b"z" * 9)
    assert _staging_bytes(store, NAME) == 1024


def test_a_folder_removed_while_it_is_read_counts_as_empty(tmp_path):
    store = Store(tmp_path)
    stop = threading.Event()

    def churn():  # what the install does, as fast as it can: files appear, then the folder goes
        while not stop.is_set():
            folder = _stage(store, {f"sub/f{i}.gguf": 10 for i in range(20)})
            shutil.rmtree(folder, ignore_errors=True)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        seen = [_staging_bytes(store, NAME) for _ in range(3000)]
    finally:
        stop.set()
        worker.join()
    assert all(0 <= n <= 200 for n in seen)
    assert max(seen) > 0  # it did read the folder while it existed
