"""Debian's Prometheus with the compose file's prometheus.yml (only the target and the key file's path
substituted) scraping a real `ggufchat serve`, and the KEDA trigger's query run on what it scraped: the
autoscaler's signal, end to end, as far as this machine allows (no cluster)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import wait_for
from tests.deploy.cluster import Load, Replica, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "compose" / "prometheus.yml"
SCALED_OBJECT = ROOT / "deploy" / "kubernetes" / "keda-scaledobject.yaml"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="prometheus is not installed (.ci/run installs it)")


def test_prometheus_scrapes_the_queue_and_the_keda_query_sees_it(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("scrape-key\n")
    replica = Replica(tmp_path, "replica", "-np", "1", "-t", "1", "--api-key-file", str(key_file))
    prometheus = None
    try:
        replica.wait_ready()
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        job = config["scrape_configs"][0]
        job["authorization"]["credentials_file"] = str(key_file)
        # The target, and the label Prometheus' kubernetes-pods job derives from the pod's
        # app.kubernetes.io/name, which the KEDA query selects on.
        job["static_configs"] = [{"targets": [replica.url.removeprefix("http://")],
                                  "labels": {"app_kubernetes_io_name": "ggufchat"}}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def query(expr: str) -> float | None:
            try:
                result = requests.get(api, params={"query": expr}, timeout=5).json()["data"]["result"]
            except (requests.RequestException, KeyError, ValueError):
                return None
            return float(result[0]["value"][1]) if result else None

        # One slot, three clients streaming back to back: one sequence decoding, two queued, for as long
        # as it takes Prometheus to scrape that.
        keda_query = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"][0]["metadata"]["query"]
        seen: list[float] = []

        def loaded() -> bool:
            value = query(keda_query)
            if value is not None:
                seen.append(value)
            return value is not None and value >= 2

        with Load(replica.url, 3, max_tokens=48, headers={"Authorization": "Bearer scrape-key"}) as load:
            assert wait_for(loaded, 40, interval=0.5), (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
            assert query('up{job="ggufchat"}') == 1.0  # scraped with the key: /metrics needs it
            assert query("ggufchat_slots") == 1.0
        assert all(o.ok for o in load.outcomes)
        print(f"\nKEDA query on Prometheus while 3 streams shared 1 slot: {max(seen):g} "
              f"(threshold 8 per replica -> ceil({max(seen):g}/8) replicas)")
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(5)
        replica.stop()
