"""The ephemeral runner Pod manifest: what the original arguments become, checked against the
Kubernetes schemas of the releases we support (kubernetes-validate ships them)."""

from __future__ import annotations

import kubernetes_validate
import pytest

from pool.ephemeral.podspec import RUNNER_SELECTOR, runner_pod

SUPPORTED_KUBERNETES = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_the_runner_pod_validates_strictly_against_the_kubernetes_schema(version):
    pod = runner_pod(image="runnable-k8s-worker:latest", namespace="team-a", image_pull_policy="IfNotPresent",
                     secret_name="runnable-k8s-ee", service_account="runner",
                     overrides={"spec": {"nodeSelector": {"pool": "llm"},
                                         "tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    kubernetes_validate.validate(pod, version, strict=True)


def test_original_keyword_arguments_map_onto_the_pod():
    pod = runner_pod(image="my/image:1", namespace="ns", image_pull_policy="Always", secret_name="keys")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "my/image:1" and container["imagePullPolicy"] == "Always"
    assert container["envFrom"] == [{"secretRef": {"name": "keys"}}]  # API keys from a Secret
    assert container["stdin"] is True and container["tty"] is False  # no TTY: stdout stays clean
    assert container["command"] == ["python", "-m", "worker", "--stdio"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["activeDeadlineSeconds"] > 0
    assert pod["metadata"]["namespace"] == "ns"


def test_labels_identify_the_project_and_the_call():
    first, second = runner_pod(image="i", namespace="n"), runner_pod(image="i", namespace="n")
    labels = first["metadata"]["labels"]
    for pair in RUNNER_SELECTOR.split(","):
        key, value = pair.split("=")
        assert labels[key] == value
    assert labels["runnable-k8s/call"] != second["metadata"]["labels"]["runnable-k8s/call"]
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_overrides_merge_deeply_and_win():
    pod = runner_pod(image="i", namespace="n", overrides={"metadata": {"labels": {"team": "a"}},
                                                          "spec": {"activeDeadlineSeconds": 60}})
    assert pod["metadata"]["labels"]["team"] == "a" and "runnable-k8s/call" in pod["metadata"]["labels"]
    assert pod["spec"]["activeDeadlineSeconds"] == 60 and pod["spec"]["containers"]


def test_no_secret_means_no_env_from():
    assert "envFrom" not in runner_pod(image="i", namespace="n", secret_name=None)["spec"]["containers"][0]
