"""The ephemeral runner Pod, built from RunnableK8s's keyword arguments (plain dicts, so they can be
validated against the Kubernetes schemas and merged with the user's overrides)."""

from __future__ import annotations

import copy
import math
import os
import re
import socket
import threading
import uuid
from typing import Any

from worker import defaults

MANAGED_BY = "runnable-k8s"
# Every label this project sets is under one prefix, runnable-k8s.io/ (role, call, owner, keep).
ROLE_LABEL = "runnable-k8s.io/role"
RUNNER_ROLE = "ephemeral-runner"
CALL_LABEL = "runnable-k8s.io/call"
# The role key runner Pods carried before it moved under runnable-k8s.io/ (with the call key, once
# runnable-k8s/call). New Pods never carry it; gc and the listing of runner Pods still look for it,
# so that a runner Pod an older release left behind is found (see RUNNER_SELECTORS).
LEGACY_ROLE_LABEL = "runnable-k8s/role"
# The client process that created the Pod: "<hostname>-<pid>-<random>" (see owner_id()).
OWNER_LABEL = "runnable-k8s.io/owner"
# "true" on a Pod kept on purpose (k8s_delete_runner_pod=False): `runnable-k8s gc` never deletes it.
KEEP_LABEL = "runnable-k8s.io/keep"
CONTAINER = "worker"
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
# The Dockerfile's user. Numeric, so that the kubelet can check runAsNonRoot without reading the
# image's /etc/passwd (and so that an image whose USER is root still runs as non-root).
RUNNER_UID = 10001
# The root filesystem is read-only; /tmp is an emptyDir, and HOME points there for libraries that
# cache under ~ (tiktoken, huggingface, matplotlib, ...).
TMP_VOLUME = "tmp"

_LABEL_VALUE_MAX = 63
_owner_lock = threading.Lock()
_owner: tuple[int, str] | None = None


def _label_safe(text: str) -> str:
    """``text`` with every character a label value may not hold replaced by "-"."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")


def owner_id() -> str:
    """This process's owner label value, made once per process (again after a fork).

    ``<hostname>-<pid>-<random>``: the host and pid let `runnable-k8s gc` on the same host tell
    whether the owner still runs; the random part keeps two hosts of the same name (containers)
    apart. At most 63 characters of ``[A-Za-z0-9_.-]``, starting and ending alphanumeric.
    """
    global _owner
    pid = os.getpid()
    with _owner_lock:
        if _owner is None or _owner[0] != pid:
            host = host_label()
            _owner = (pid, f"{host}-{pid}-{uuid.uuid4().hex[:8]}" if host else f"{pid}-{uuid.uuid4().hex[:8]}")
        return _owner[1]


def host_label() -> str:
    """This host's name as it appears in owner labels (sanitized, at most 40 characters)."""
    return _label_safe(_label_safe(socket.gethostname())[:40])


def parse_owner(owner: str) -> tuple[str, int] | None:
    """``(host, pid)`` of an owner label value made by :func:`owner_id`, else None."""
    parts = owner.rsplit("-", 2)
    if len(parts) == 2:
        parts = ["", *parts]
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def runner_labels(call_id: str, owner: str | None = None, keep: bool = False) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "runnable-k8s",
        "app.kubernetes.io/component": RUNNER_ROLE,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ROLE_LABEL: RUNNER_ROLE,
        CALL_LABEL: call_id,
        OWNER_LABEL: _label_safe(_label_safe(owner or owner_id())[:_LABEL_VALUE_MAX]) or "unknown",
    }
    if keep:
        labels[KEEP_LABEL] = "true"
    return labels


def active_deadline(remaining: float | None) -> int:
    """activeDeadlineSeconds for a call with ``remaining`` seconds left of its timeout (None: no
    timeout): what is left plus a margin, or the default deadline without a timeout."""
    if remaining is None:
        return defaults.EPHEMERAL_ACTIVE_DEADLINE
    return max(1, math.ceil(max(0.0, remaining) + defaults.EPHEMERAL_DEADLINE_MARGIN))


RUNNER_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},{ROLE_LABEL}={RUNNER_ROLE}"
"""The label selector of the runner Pods this release makes."""
LEGACY_RUNNER_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},{LEGACY_ROLE_LABEL}={RUNNER_ROLE}"
"""The label selector of runner Pods made by releases before the role label moved under
runnable-k8s.io/ (a selector cannot say "this key or that one", so they are listed apart)."""
RUNNER_SELECTORS = (RUNNER_SELECTOR, LEGACY_RUNNER_SELECTOR)
"""Every selector that finds runner Pods, this release's and older ones': what gc lists with."""


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
    owner: str | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """A Pod manifest running ``python -m worker --stdio`` with stdin open and no TTY.

    Restricted (the Pod Security Standard's "restricted" profile): non-root uid 10001, the
    RuntimeDefault seccomp profile, no privilege escalation, no capabilities, a read-only root
    filesystem with an emptyDir at /tmp, and no ServiceAccount token. The environment gets a
    Secret only when ``secret_name`` names one. ``owner`` (default: this process's
    :func:`owner_id`) and ``keep`` become labels that `runnable-k8s gc` reads.

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
        "env": [{"name": "HOME", "value": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    if secret_name:
        container["envFrom"] = [{"secretRef": {"name": secret_name}}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": active_deadline_seconds,
        "terminationGracePeriodSeconds": 0,
        # The runner never calls the Kubernetes API; code it runs must not get a token either.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": TMP_VOLUME, "emptyDir": {}}],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"runnable-k8s-runner-{call_id}", "namespace": namespace,
                     "labels": runner_labels(call_id, owner, keep)},
        "spec": spec,
    }
    return deep_merge(pod, overrides) if overrides else pod
