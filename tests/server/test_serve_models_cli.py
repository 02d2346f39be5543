"""`ggufchat serve` with several models as a user starts it: a config file, a models folder, a real
process; and the config file's checks, each an `Error:` line."""

from __future__ import annotations

import openai
import pytest
import requests

from ggufchat.cli.serve_models import parse_size, read_models_config
from ggufchat.errors import InvalidParameter
from tests.conftest import run_cli, wait_for
from tests.server.test_serve_cli import _start, _stop, _wait_ready

HI = [{"role": "user", "content": "Say hello."}]


def _cards(url: str) -> dict[str, dict]:
    return {card["id"]: card for card in requests.get(url + "/v1/models", timeout=10).json()["data"]}


def test_config_file_models_dir_and_cache_served_by_name(tmp_path, model_path, qwen_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "coder-copy.gguf").symlink_to(qwen_path)  # the file of [models.coder]: an alias, not a copy
    (folder / "second.gguf").symlink_to(model_path)
    config = tmp_path / "models.toml"
    config.write_text(f"""
default = "tiny"
[defaults]
threads = 2
[models.tiny]
model = "{model_path}"
parallel = 1
ctx_size = 1024
[models.coder]
model = "{qwen_path}"
aliases = ["gpt-4o-mini"]
ctx-size = 4096
parallel = 2
keep_alive = 0
""")
    proc, url = _start("--models-config", str(config), "--models-dir", str(folder), "--max-loaded", "1",
                       env={"GGUFCHAT_HOME": str(tmp_path / "home")})
    try:
        _wait_ready(url)
        cards = _cards(url)
        # The folder's files are the config's models under other names; the embedded model is tiny's file.
        assert set(cards) == {"tiny", "coder"}
        assert cards["coder"]["aliases"] == ["gpt-4o-mini", "coder-copy"]
        assert cards["tiny"]["status"] == "ready" and cards["tiny"]["n_ctx_per_sequence"] == 1024
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=3)
        assert reply.model == "coder"
        # coder's keep_alive 0: unloaded once its request ended; --max-loaded 1 had evicted tiny for it.
        assert wait_for(lambda: _cards(url)["coder"]["status"] == "unloaded", 10)
        assert _cards(url)["tiny"]["status"] == "unloaded"
        assert client.chat.completions.create(messages=HI, max_tokens=2, model="second").model == "tiny"
        assert _cards(url)["tiny"]["n_parallel"] == 1
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "serving 2 models (default 'tiny'" in proc.banner and "at most 1 loaded" in proc.banner
    assert "Traceback" not in err


@pytest.mark.parametrize(("text", "message"), [
    ("[models.a]\nctx_sise = 1", "[models.a] ctx_sise is not a setting"),
    ("[models.a]\nctx_size = \"big\"", "[models.a] ctx_size must be a number"),
    ("[models.a]\nflash_attn = \"sometimes\"", "[models.a]: --flash-attn must be one of"),
    ("[models.a]\nkeep_alive = \"soon\"", "[models.a] keep_alive: keep_alive 'soon' is not a duration"),
    ("[defaults]\naliases = [\"x\"]", "[defaults] aliases belongs in a model's own table"),
    ("[models.a]\ndraft-max = 100", "[models.a]: --draft-max must be between 1 and 64"),
    ("default = \"b\"\n[models.a]\n", "default 'b' is not one of the [models.NAME] tables"),
    ("[models\n", "is not valid TOML"),
])
def test_config_mistakes_are_one_error_line(tmp_path, text, message):
    config = tmp_path / "models.toml"
    config.write_text(text)
    with pytest.raises(InvalidParameter) as err:
        read_models_config(config)
    assert message in str(err.value) and str(config) in str(err.value)


def test_serve_reports_a_bad_config_or_model_before_listening(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text("[models.a]\nparallel = 0\n")
    r = run_cli("serve", "--models-config", str(config), env={"GGUFCHAT_HOME": str(tmp_path)})
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "[models.a] parallel must be at least 1" in r.stderr
    config.write_text(f"[models.a]\nmodel = \"{tmp_path / 'missing.gguf'}\"\n")
    r = run_cli("serve", "--models-config", str(config), env={"GGUFCHAT_HOME": str(tmp_path)})
    assert r.returncode == 1 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--memory-budget", "lots", "--models-dir", str(tmp_path))
    assert r.returncode == 1 and "--memory-budget must be a size" in r.stderr


def test_sizes():
    assert parse_size("12GiB") == 12 << 30 and parse_size("800M") == 800 << 20
    assert parse_size("1.5g") == 3 << 29 and parse_size("4096") == 4096 and parse_size("0") == 0
    with pytest.raises(InvalidParameter):
        parse_size("12 parsecs")
