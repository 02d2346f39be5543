"""The chat in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

if shutil.which("tmux") is None:  # .ci/run installs tmux; a developer machine without it is told why
    pytest.fail("tmux is needed for the terminal tests (apt-get install tmux)", pytrace=False)


class Terminal:
    def __init__(self, command: str) -> None:
        self.name = f"ggufchat-{uuid.uuid4().hex[:8]}"
        args = ["tmux", "new-session", "-d", "-s", self.name, "-x", "150", "-y", "50",
                f"env NO_COLOR=1 {command}; echo EXITED=$?; sleep 30"]
        # The previous test's kill-session can leave the tmux server exiting as this one connects
        # ("server exited unexpectedly"): start again on a fresh server.
        for _ in range(3):
            started = subprocess.run(args, capture_output=True, text=True)
            if started.returncode == 0:
                break
            time.sleep(0.5)
        assert started.returncode == 0, started.stderr

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                              capture_output=True, text=True).stdout

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out; the screen shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def prompts(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("> "))


@pytest.fixture
def term():
    cmd = f"{shlex.quote(sys.executable)} -m ggufchat chat -n 600 --temp 0 --ignore-eos"
    t = Terminal(cmd)
    yield t
    t.close()


def test_stream_stop_regen_exit(term: Terminal):
    term.wait_for(lambda s: "Type a message" in s and s.rstrip().endswith(">"))
    term.send("Write a long story about a dragon.", "Enter")
    # The reply streams in: the screen grows while the model is still talking.
    first = term.wait_for(lambda s: len(s.split("dragon.", 1)[-1].strip()) > 20)
    shown = len(first.split("dragon.", 1)[-1].strip())
    later = term.wait_for(lambda s: len(s.split("dragon.", 1)[-1].strip()) > shown + 20)
    assert prompts(later) == 1  # still replying: no new prompt yet
    term.send("C-c")
    stopped = term.wait_for(lambda s: "[stopped]" in s and prompts(s) == 2, timeout=20)
    assert "Traceback" not in stopped
    # The conversation survived: /regen answers the same message again (greedy: same opening).
    term.send("/regen", "Enter")
    term.wait_for(lambda s: s.count("[stopped]") == 1 and len(s.split("/regen", 1)[-1].strip()) > 20)
    term.send("C-c")
    term.wait_for(lambda s: s.count("[stopped]") == 2 and prompts(s) == 3, timeout=20)
    screen = term.screen()
    opening = screen.split("dragon.", 1)[1].strip()[:20]
    assert screen.split("/regen", 1)[1].strip().startswith(opening)
    term.send("/exit", "Enter")
    screen = term.wait_for(lambda s: "EXITED=" in s, timeout=20)
    assert "EXITED=0" in screen and "Traceback" not in screen


def test_ctrl_d_at_empty_prompt_exits(term: Terminal):
    term.wait_for(lambda s: s.rstrip().endswith(">"))
    term.send("C-d")
    screen = term.wait_for(lambda s: "EXITED=" in s, timeout=20)
    assert "EXITED=0" in screen and "Traceback" not in screen


def test_ctrl_c_at_empty_prompt_exits(term: Terminal):
    term.wait_for(lambda s: s.rstrip().endswith(">"))
    term.send("C-c")
    screen = term.wait_for(lambda s: "EXITED=" in s, timeout=20)
    assert "EXITED=0" in screen and "Traceback" not in screen
