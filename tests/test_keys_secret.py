"""`runnable-k8s keys DIR --k8s-secret NAME`: the keys as the Secret the chart mounts."""

from __future__ import annotations

import base64
import subprocess
import sys

import kubernetes_validate
import pytest

from pool.keys import create_key_directory, key_secret_manifest

KEY_FILES = {"broker.key", "broker.key_secret", "client.key", "client.key_secret", "worker.key", "worker.key_secret"}


def test_the_secret_holds_the_top_level_key_files_and_validates(tmp_path):
    directory = create_key_directory(tmp_path / "keys")
    secret = key_secret_manifest(directory, "runnable-k8s-curve")
    assert set(secret["data"]) == KEY_FILES  # authorized/ is rebuilt by the chart from these
    assert base64.b64decode(secret["data"]["worker.key"]) == (directory / "worker.key").read_bytes()
    kubernetes_validate.validate({**secret, "metadata": {**secret["metadata"], "namespace": "x"}}, "1.33", strict=True)


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_keys_command_creates_the_secret(k8s_control_plane, k8s_namespace, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pool", "keys", str(tmp_path / "keys"), "--k8s-secret", "curve",
         "-n", k8s_namespace, "--kubeconfig", k8s_control_plane.kubeconfig],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    secret = k8s_control_plane.core().read_namespaced_secret("curve", k8s_namespace)
    assert set(secret.data) == KEY_FILES
    assert "curve.existingSecret=curve" in result.stdout
