"""`runnable-k8s keys DIR --k8s-secret PREFIX`: the keys as the Secrets the chart mounts, one per
role, so that no Pod is given a secret that is not its own (a worker Pod never holds the broker's
secret key, a client Pod never the workers')."""

from __future__ import annotations

import base64
import subprocess
import sys

import kubernetes_validate
import pytest

from pool.keys import add_client, create_key_directory, is_allow_list, key_secret_manifests

PAIRS = {
    "curve-broker": {"broker.key", "broker.key_secret"},
    "curve-worker": {"worker.key", "worker.key_secret", "broker.key"},
    "curve-client-default": {"client.key", "client.key_secret", "broker.key"},
    "curve-client-web": {"client.key", "client.key_secret", "broker.key"},
}
ALLOW_LISTS = {"curve-clients": {"default.key", "web.key"}, "curve-workers": {"worker.key"}}


def data(manifest: dict) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in manifest["data"].items()}


def test_one_secret_per_role_each_with_only_its_own_files_and_valid(tmp_path):
    directory = create_key_directory(tmp_path / "keys", ["default", "web"])
    secrets = {m["metadata"]["name"]: m for m in key_secret_manifests(directory, "curve")}
    assert {name: set(m["data"]) for name, m in secrets.items()} == {**PAIRS, **ALLOW_LISTS}
    assert data(secrets["curve-broker"])["broker.key_secret"] == (directory / "broker/broker.key_secret").read_bytes()
    assert data(secrets["curve-worker"])["worker.key_secret"] == (directory / "worker/worker.key_secret").read_bytes()
    assert data(secrets["curve-client-web"])["client.key_secret"] == (
        directory / "clients/web/client.key_secret").read_bytes()
    assert data(secrets["curve-clients"])["web.key"] == (directory / "clients/web/client.key").read_bytes()
    assert data(secrets["curve-workers"])["worker.key"] == (directory / "worker/worker.key").read_bytes()
    # Only the broker's own Secret and each role's own pair hold a secret key.
    holders = {name for name, m in secrets.items() if any(key.endswith("_secret") for key in m["data"])}
    assert holders == set(PAIRS)
    assert {name for name, m in secrets.items() if is_allow_list(m)} == set(ALLOW_LISTS)
    for manifest in secrets.values():
        kubernetes_validate.validate({**manifest, "metadata": {**manifest["metadata"], "namespace": "x"}},
                                     "1.33", strict=True)


def test_an_added_client_appears_in_the_allow_list_secret(tmp_path):
    directory = create_key_directory(tmp_path / "keys")
    add_client(directory, "batch")
    secrets = {m["metadata"]["name"]: m for m in key_secret_manifests(directory, "p")}
    assert set(secrets["p-clients"]["data"]) == {"default.key", "batch.key"}
    assert "p-client-batch" in secrets


def run_keys(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pool", "keys", *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_keys_command_creates_the_secrets_and_a_rerun_updates_the_allow_list(k8s_control_plane, k8s_namespace,
                                                                             tmp_path):
    cluster = ["-n", k8s_namespace, "--kubeconfig", k8s_control_plane.kubeconfig]
    directory = str(tmp_path / "keys")
    result = run_keys(directory, "--k8s-secret", "curve", *cluster)
    assert result.returncode == 0, result.stderr
    assert "curve.existingSecret=curve" in result.stdout
    core = k8s_control_plane.core()

    def secret_keys(name: str) -> set[str]:
        return set(core.read_namespaced_secret(name, k8s_namespace).data)

    assert secret_keys("curve-broker") == PAIRS["curve-broker"]
    assert secret_keys("curve-worker") == PAIRS["curve-worker"]
    assert secret_keys("curve-client-default") == PAIRS["curve-client-default"]
    assert secret_keys("curve-clients") == {"default.key"}
    assert secret_keys("curve-workers") == {"worker.key"}
    broker_before = core.read_namespaced_secret("curve-broker", k8s_namespace).data

    # Adding a client: its own Secret, and the allow-list replaced; the broker's pair untouched.
    added = run_keys(directory, "--client", "web", "--k8s-secret", "curve", *cluster)
    assert added.returncode == 0, added.stderr
    assert secret_keys("curve-clients") == {"default.key", "web.key"}
    assert secret_keys("curve-client-web") == PAIRS["curve-client-web"]
    assert core.read_namespaced_secret("curve-broker", k8s_namespace).data == broker_before

    # Revoking one: off the allow-list, its Secret deleted.
    revoked = run_keys(directory, "--revoke", "default", "--k8s-secret", "curve", *cluster)
    assert revoked.returncode == 0, revoked.stderr
    assert secret_keys("curve-clients") == {"web.key"}
    names = {s.metadata.name for s in core.list_namespaced_secret(k8s_namespace).items}
    assert "curve-client-default" not in names and "curve-client-web" in names
