"""A real Prometheus server for the tests: its own process on 127.0.0.1, its own data folder,
scraping what the test says, and its HTTP API read with the standard library.

    with PrometheusServer(tmp, config) as prom:
        prom.query('up')          # the result list of /api/v1/query

Debian's ``prometheus`` package gives the binary (``apt-get install -y prometheus``); the test
starts its own process and never the package's service. The process is stopped (killed after
10 s) on exit, so no scrape outlives the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.ports import free_port
from tests.support.processes import Started, fail_if_exited, stop_process
from tests.support.waiting import wait_for

__all__ = ["PrometheusServer", "helm_binary", "prometheus_binary"]


def helm_binary() -> str | None:
    """The helm CLI the cluster tests build (tests/cluster/build.sh binaries), else one on PATH, else None:
    the rules and the dashboard Prometheus loads are the chart's, rendered."""
    from tests.cluster.cluster import BIN

    path = BIN / "helm"
    return str(path) if os.access(path, os.X_OK) else shutil.which("helm")


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable on PATH, or None."""
    return shutil.which("prometheus")


class PrometheusServer(Started):
    """One Prometheus process with ``config`` (a prometheus.yml as a dict) under ``folder``."""

    def __init__(self, folder: Path, config: dict[str, Any], rules: dict[str, Any] | None = None) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed: apt-get install -y prometheus")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = dict(config)
        if rules is not None:
            self.rules_file = folder / "rules.yaml"
            self.rules_file.write_text(yaml.safe_dump(rules))
            self.config["rule_files"] = [str(self.rules_file)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "prometheus.log"

    def start(self) -> None:
        config_file = self.folder / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, f"Prometheus to be ready on {self.url} (its log: {self.log})", ignore=(OSError,))

    def close(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self.proc = None

    def _ready(self) -> bool:
        fail_if_exited(self.proc, "Prometheus", self.log, 2000)
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns ``data``, or raises AssertionError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one entry) ``expr`` gives now."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"value": result}]
        return list(result)

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now."""
        return list(self.api("alerts")["alerts"])

    def alert_state(self, name: str) -> str | None:
        """The state of the alert ``name`` now ("pending", "firing"), or None when it is not active."""
        found = [a for a in self.alerts() if a["labels"]["alertname"] == name]
        return str(found[0]["state"]) if found else None
