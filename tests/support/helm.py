"""The helm CLI as the tests run it: its own home folders, the chart of this checkout, values
written to a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.support.paths import CHART

__all__ = ["CHART", "helm", "values_file"]


def helm(helm_bin: str, *args: str, tmp_path: Path, kubeconfig: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    """Run helm with its own home folders (nothing read from or written to the user's)."""
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HELM_CACHE_HOME": str(tmp_path / "helm-cache"), "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
           "HELM_DATA_HOME": str(tmp_path / "helm-data")}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=timeout, env=env)


def values_file(tmp_path: Path, values: dict, name: str = "values.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)
