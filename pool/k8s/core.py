"""A CoreV1Api for the command line's Kubernetes verbs (``keys --k8s-secret``, ``gc``), whose
missing configuration is one line that says what to do rather than the kubernetes client's
ConfigException and its traceback."""

from __future__ import annotations

import os
from typing import Any

from pool.errors import RunnableK8sError


def core_api(kubeconfig: str | None) -> Any:
    """A CoreV1Api from ``kubeconfig`` (None: in-cluster config in a Pod, else KUBECONFIG or
    ~/.kube/config). A missing or unreadable configuration raises RunnableK8sError with the fix,
    not the kubernetes client's ConfigException and its traceback."""
    from kubernetes.client import CoreV1Api

    from pool.k8s.api import api_client

    try:
        return CoreV1Api(api_client(os.path.expanduser(kubeconfig) if kubeconfig else None))
    except Exception as exc:  # ConfigException, a missing file, a malformed one
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RunnableK8sError(
            f"no usable Kubernetes configuration in {where} ({reason}): pass --kubeconfig PATH, set KUBECONFIG, "
            "or check that `kubectl cluster-info` works") from exc
