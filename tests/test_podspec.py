"""The ephemeral runner Pod manifest: what the original arguments become, checked against the
Kubernetes schemas of the releases we support (kubernetes-validate ships them)."""

from __future__ import annotations

import os
import re
import time

import kubernetes_validate
import pytest

from pool.ephemeral.k8s_launcher import KubernetesLauncher
from pool.ephemeral.podspec import (
    CALL_LABEL,
    KEEP_LABEL,
    OWNER_LABEL,
    RUNNER_SELECTOR,
    owner_id,
    parse_owner,
    runner_pod,
)
from worker import defaults

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

SUPPORTED_KUBERNETES = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_the_runner_pod_validates_strictly_against_the_kubernetes_schema(version):
    pod = runner_pod(image="runnable-k8s-worker:latest", namespace="team-a", image_pull_policy="IfNotPresent",
                     secret_name="runnable-k8s-ee", service_account="runner",
                     overrides={"spec": {"nodeSelector": {"pool": "llm"},
                                         "tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    kubernetes_validate.validate(pod, version, strict=True)
    for manifest in (runner_pod(image="i", namespace="n"),
                     KubernetesLauncher(image="i", delete_pod=False).manifest(time.monotonic() + 30)):
        kubernetes_validate.validate(manifest, version, strict=True)


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
    assert labels[CALL_LABEL] != second["metadata"]["labels"][CALL_LABEL]
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_every_label_of_the_project_is_under_one_prefix():
    # One naming scheme: runnable-k8s.io/role, /call, /owner, /keep (the role and call keys were
    # once runnable-k8s/role and runnable-k8s/call; gc still finds Pods labelled so: tests/test_gc.py).
    labels = runner_pod(image="i", namespace="n", keep=True)["metadata"]["labels"]
    ours = [key for key in labels if key.split("/")[0].startswith("runnable-k8s")]
    assert sorted(ours) == ["runnable-k8s.io/call", "runnable-k8s.io/keep", "runnable-k8s.io/owner",
                            "runnable-k8s.io/role"]
    assert labels["runnable-k8s.io/role"] == "ephemeral-runner"
    assert "runnable-k8s.io/role=ephemeral-runner" in RUNNER_SELECTOR.split(",")


def test_overrides_merge_deeply_and_win():
    pod = runner_pod(image="i", namespace="n", overrides={"metadata": {"labels": {"team": "a"}},
                                                          "spec": {"activeDeadlineSeconds": 60}})
    assert pod["metadata"]["labels"]["team"] == "a" and CALL_LABEL in pod["metadata"]["labels"]
    assert pod["spec"]["activeDeadlineSeconds"] == 60 and pod["spec"]["containers"]


def test_no_secret_means_no_env_from():
    assert "envFrom" not in runner_pod(image="i", namespace="n", secret_name=None)["spec"]["containers"][0]


def test_the_runner_pod_is_restricted():
    """The Pod Security Standard's "restricted" profile, no token, and /tmp the only writable place."""
    spec = runner_pod(image="i", namespace="n")["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user, numeric
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    container = spec["containers"][0]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert spec["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_the_dockerfile_user_is_the_pods_uid():
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert "ARG UID=10001" in dockerfile and "USER ${UID}:${UID}" in dockerfile


def test_no_secret_unless_the_caller_names_one():
    from pool import RunnableK8s

    assert defaults.EPHEMERAL_SECRET_NAME is None
    assert RunnableK8s.model_fields["k8s_secret_name"].default is None
    assert "envFrom" not in KubernetesLauncher(image="i").manifest()["spec"]["containers"][0]
    named = KubernetesLauncher(image="i", secret_name="runnable-k8s-ee").manifest()  # the original's, explicitly
    assert named["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "runnable-k8s-ee"}}]


def test_the_deadline_follows_the_calls_timeout():
    launcher = KubernetesLauncher(image="i")
    assert launcher.manifest(None)["spec"]["activeDeadlineSeconds"] == defaults.EPHEMERAL_ACTIVE_DEADLINE
    deadline = launcher.manifest(time.monotonic() + 90)["spec"]["activeDeadlineSeconds"]
    assert 90 + defaults.EPHEMERAL_DEADLINE_MARGIN - 2 <= deadline <= 90 + defaults.EPHEMERAL_DEADLINE_MARGIN
    assert launcher.manifest(time.monotonic() + 7200)["spec"]["activeDeadlineSeconds"] > 7200  # longer than the default
    # A deadline already passed still gives a valid (positive) value.
    assert launcher.manifest(time.monotonic() - 5)["spec"]["activeDeadlineSeconds"] >= 1


def test_every_pod_of_a_process_carries_the_same_valid_owner_label():
    first, second = runner_pod(image="i", namespace="n"), runner_pod(image="i", namespace="n")
    owner = first["metadata"]["labels"][OWNER_LABEL]
    assert owner == second["metadata"]["labels"][OWNER_LABEL] == owner_id()
    assert len(owner) <= 63 and LABEL_VALUE.match(owner)
    _host, pid = parse_owner(owner) or ("", 0)
    assert pid == os.getpid()
    weird = runner_pod(image="i", namespace="n", owner="a" * 70 + " b/c")["metadata"]["labels"][OWNER_LABEL]
    assert len(weird) <= 63 and LABEL_VALUE.match(weird)


def test_the_owner_survives_any_hostname(monkeypatch):
    import pool.ephemeral.podspec as podspec

    for hostname in ("x" * 200, "host_with.dots-and_underscores", "-weird-", "ünïcode", ""):
        monkeypatch.setattr(podspec.socket, "gethostname", lambda h=hostname: h)
        monkeypatch.setattr(podspec, "_owner", None)
        owner = podspec.owner_id()
        assert len(owner) <= 63 and LABEL_VALUE.match(owner), (hostname, owner)
        assert parse_owner(owner) == (podspec.host_label(), os.getpid())


def test_a_kept_pod_is_labelled_so_gc_leaves_it():
    assert KubernetesLauncher(image="i", delete_pod=False).manifest()["metadata"]["labels"][KEEP_LABEL] == "true"
    assert KEEP_LABEL not in KubernetesLauncher(image="i").manifest()["metadata"]["labels"]


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_user_overrides_still_validate(version):
    pod = runner_pod(image="i", namespace="n", overrides={
        "spec": {"securityContext": {"runAsUser": 20000}, "automountServiceAccountToken": True}})
    context = pod["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 20000
    kubernetes_validate.validate(pod, version, strict=True)


def test_launch_sends_the_pod_with_the_calls_deadline(monkeypatch):
    """The wiring: Session passes the call's deadline to launch(), which builds the Pod from it."""
    from kubernetes.client.rest import ApiException

    from pool.errors import PodFailed

    sent: list[dict] = []

    class Core:
        def create_namespaced_pod(self, namespace, manifest):
            sent.append(manifest)
            raise ApiException(status=403, reason="Forbidden")

    launcher = KubernetesLauncher(image="i", namespace="n", delete_pod=False)
    monkeypatch.setattr(launcher, "core", Core)
    for deadline in (time.monotonic() + 60, None):
        with pytest.raises(PodFailed):
            launcher.launch(deadline)
    with_timeout, without = (pod["spec"]["activeDeadlineSeconds"] for pod in sent)
    assert 60 <= with_timeout <= 60 + defaults.EPHEMERAL_DEADLINE_MARGIN
    assert without == defaults.EPHEMERAL_ACTIVE_DEADLINE
    assert all(pod["metadata"]["labels"][KEEP_LABEL] == "true" for pod in sent)
    assert all(pod["metadata"]["labels"][OWNER_LABEL] == owner_id() for pod in sent)
