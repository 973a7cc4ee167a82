"""The ephemeral runner Pod, built from RunnableK8s's keyword arguments (plain dicts, so they can be
validated against the Kubernetes schemas and merged with the user's overrides)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from worker import defaults

MANAGED_BY = "runnable-k8s"
ROLE_LABEL = "runnable-k8s/role"
RUNNER_ROLE = "ephemeral-runner"
CALL_LABEL = "runnable-k8s/call"
CONTAINER = "worker"
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def runner_labels(call_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "runnable-k8s",
        "app.kubernetes.io/component": RUNNER_ROLE,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ROLE_LABEL: RUNNER_ROLE,
        CALL_LABEL: call_id,
    }


RUNNER_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},{ROLE_LABEL}={RUNNER_ROLE}"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; nested mappings merge; lists and scalars replace."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def runner_pod(
    *,
    image: str,
    namespace: str,
    image_pull_policy: str | None = None,
    secret_name: str | None = None,
    service_account: str | None = None,
    resources: dict[str, Any] | None = None,
    # A Pod that somehow outlives its caller (the client was SIGKILLed) stops by itself after
    # this; `runnable-k8s gc` removes what is left.
    active_deadline_seconds: int = defaults.EPHEMERAL_ACTIVE_DEADLINE,
    overrides: dict[str, Any] | None = None,
    call_id: str | None = None,
) -> dict[str, Any]:
    """A Pod manifest running ``python -m worker --stdio`` with stdin open and no TTY.

    ``overrides`` is merged into the whole manifest, e.g.
    ``{"spec": {"nodeSelector": {...}, "tolerations": [...]}}``.
    """
    call_id = call_id or uuid.uuid4().hex[:12]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": ["python", "-m", "worker", "--stdio"],
        "stdin": True,
        "stdinOnce": True,  # stdin closes when we detach: the worker then exits
        "tty": False,  # a TTY would mix stderr into stdout and mangle bytes
        "resources": resources if resources is not None else copy.deepcopy(DEFAULT_RESOURCES),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    if secret_name:
        container["envFrom"] = [{"secretRef": {"name": secret_name}}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": active_deadline_seconds,
        "terminationGracePeriodSeconds": 0,
        "containers": [container],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"runnable-k8s-runner-{call_id}", "namespace": namespace,
                     "labels": runner_labels(call_id)},
        "spec": spec,
    }
    return deep_merge(pod, overrides) if overrides else pod
