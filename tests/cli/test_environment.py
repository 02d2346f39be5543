"""Variables of other tools (NO_COLOR, LLAMA_CACHE, ...) and GGUFCHAT_DEBUG are read through Settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggufchat.cli.chat import _use_color
from ggufchat.cli.main import _debug
from ggufchat.errors import InvalidParameter
from ggufchat.settings import Settings, load_settings

_READ = ("NO_COLOR", "GGUFCHAT_DEBUG", "GGUFCHAT_OFFLINE", "LLAMA_CACHE", "XDG_CACHE_HOME", "MODELSCOPE_ENDPOINT",
         "GGUFCHAT_MS_ENDPOINT")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in _READ:
        monkeypatch.delenv(name, raising=False)


def test_no_color_turns_colour_off_even_when_asked(monkeypatch):
    assert _use_color(True, load_settings())
    monkeypatch.setenv("NO_COLOR", "0")  # no-color.org: any non-empty value
    assert not _use_color(True, load_settings())
    assert not _use_color(None, load_settings())
    monkeypatch.setenv("NO_COLOR", "")
    assert _use_color(True, load_settings())


def test_debug_switch(monkeypatch):
    assert not _debug()
    for value, on in (("1", True), ("true", True), ("YES", True), ("0", False), ("no", False), ("junk", False)):
        monkeypatch.setenv("GGUFCHAT_DEBUG", value)
        assert _debug() is on, value


def test_an_unreadable_variable_is_one_error_naming_it(monkeypatch):
    monkeypatch.setenv("GGUFCHAT_OFFLINE", "maybe")
    with pytest.raises(InvalidParameter, match="GGUFCHAT_OFFLINE"):
        load_settings()
    assert not _debug()  # and it does not take the debug switch (or --help) down with it


def test_debug_shows_the_traceback_through_the_cli(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    env = {k: v for k, v in os.environ.items() if k != "GGUFCHAT_DEBUG"} | {"NO_COLOR": "1"}

    def run(extra: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ggufchat", "chat", "-m", missing, "-p", "hi"],
                              capture_output=True, text=True, timeout=120, env=env | extra)

    quiet, loud = run({}), run({"GGUFCHAT_DEBUG": "1"})
    assert quiet.returncode == 1 and quiet.stderr.startswith("Error:") and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_llama_cache_folder(monkeypatch, tmp_path):
    assert load_settings().llama_cache_dir == Path.home() / ".cache" / "llama.cpp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_settings().llama_cache_dir == tmp_path / "xdg" / "llama.cpp"
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "lc"))
    assert load_settings().llama_cache_dir == tmp_path / "lc"


def test_modelscope_endpoint(monkeypatch):
    assert load_settings().ms_endpoint is None
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://ms.example")
    assert load_settings().ms_endpoint == "http://ms.example"
    monkeypatch.setenv("GGUFCHAT_MS_ENDPOINT", "http://ours.example")  # ours wins, as before
    assert load_settings().ms_endpoint == "http://ours.example"
    assert Settings(ms_endpoint="http://x").ms_endpoint == "http://x"  # by field name too
