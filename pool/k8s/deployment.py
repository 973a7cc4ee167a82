"""A worker Deployment's replica count, through its ``scale`` subresource (what ``kubectl scale`` does).

    scale_deployment(2, namespace="team-a", deployment="my-pool-worker", kubeconfig="~/.kube/config")
    scale_deployment(2, namespace="team-a", release="my-pool")   # the chart release's worker Deployment

``runnable-k8s scale`` and the autoscaler (``pool.scaling.autoscaler``) use the same class. Only
the scale subresource is touched, so the identity needs just ``get`` and ``patch`` on
``deployments/scale``, never the right to rewrite the Deployment.
"""

from __future__ import annotations

import os
from typing import Any

from pool.errors import ScalingError
from pool.k8s.api import api_client as make_api_client
from pool.k8s.api import api_error

WORKER_COMPONENT = "worker"  # the chart's app.kubernetes.io/component of the worker Deployment
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class DeploymentScaler:
    """A Deployment's ``spec.replicas`` through its scale subresource (what ``kubectl scale`` does)."""

    def __init__(self, namespace: str, name: str, api_client: Any) -> None:
        from kubernetes.client import AppsV1Api

        self.namespace = namespace
        self.name = name
        self.apps = AppsV1Api(api_client)

    def current(self) -> int:
        try:
            scale = self.apps.read_namespaced_deployment_scale(self.name, self.namespace)
        except Exception as exc:  # ApiException and connection errors alike
            raise self._error(exc, "get") from exc
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def scale(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        try:
            self.apps.patch_namespaced_deployment_scale(self.name, self.namespace, {"spec": {"replicas": replicas}})
        except Exception as exc:
            raise self._error(exc, "patch") from exc

    def describe(self) -> str:
        return f"deployment {self.namespace}/{self.name}"

    def _error(self, exc: Exception, verb: str) -> ScalingError:
        return _scaling_error(exc, verb, "deployments/scale", self.namespace, self.name)


def _scaling_error(exc: Exception, verb: str, resource: str, namespace: str, name: str | None = None) -> ScalingError:
    return api_error(exc, verb, resource, namespace, name=name, error=ScalingError, api_group="apps",
                     granted_by="your kubeconfig's user, or the broker Pod's ServiceAccount; the worker-pool "
                                "chart creates the Role when autoscaling is enabled")


def default_namespace(kubeconfig: Any = None) -> str:
    """The namespace to use when none is named, as kubectl picks it: the Pod's own namespace in a
    Pod (POD_NAMESPACE, then the ServiceAccount's file), else the kubeconfig context's, else
    ``default``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(IN_CLUSTER_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        pass
    if kubeconfig is None or isinstance(kubeconfig, str):
        try:
            from kubernetes import config

            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            return str(active.get("context", {}).get("namespace") or "default")
        except Exception:  # noqa: BLE001 - no kubeconfig: the default namespace
            pass
    return "default"


def find_worker_deployment(api_client: Any, namespace: str, release: str) -> str:
    """The name of the worker Deployment of a chart release (found by its labels)."""
    from kubernetes.client import AppsV1Api

    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component={WORKER_COMPONENT}"
    try:
        items = AppsV1Api(api_client).list_namespaced_deployment(namespace, label_selector=selector).items
    except Exception as exc:
        raise _scaling_error(exc, "list", "deployments", namespace) from exc
    names = [d.metadata.name for d in items if d.metadata is not None and d.metadata.name]
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise ScalingError(
            f"expected one worker Deployment of release {release!r} in namespace {namespace!r} (labels {selector}), "
            f"found {found}; pass --deployment NAME (or deployment=) to choose it"
        )
    return str(names[0])


def deployment_scaler(namespace: str | None = None, deployment: str | None = None, release: str | None = None,
                      kubeconfig: Any = None) -> DeploymentScaler:
    """A DeploymentScaler for a named Deployment or a release's worker Deployment.

    ``kubeconfig``: a path, a ``kubernetes.client.Configuration``, an ``ApiClient``, or None
    (in-cluster config inside a Pod, else the default kubeconfig)."""
    if (deployment is None) == (release is None):
        raise ValueError("name the Deployment (deployment=...) or the chart release (release=...), not both")
    if isinstance(kubeconfig, str):
        kubeconfig = os.path.expanduser(kubeconfig)
    namespace = namespace or default_namespace(kubeconfig)
    try:
        client = make_api_client(kubeconfig)  # an ApiClient passed in is used as it is
    except Exception as exc:  # kubeconfig missing or unreadable
        raise ScalingError(f"no Kubernetes configuration: {exc}. Pass --kubeconfig PATH or set KUBECONFIG") from exc
    name = deployment or find_worker_deployment(client, namespace, release or "")
    return DeploymentScaler(namespace, name, client)


def scale_deployment(replicas: int, *, namespace: str | None = None, deployment: str | None = None,
                     release: str | None = None, kubeconfig: Any = None) -> DeploymentScaler:
    """Set a worker Deployment's replicas (scale subresource); returns the scaler used."""
    scaler = deployment_scaler(namespace, deployment, release, kubeconfig)
    scaler.scale(replicas)
    return scaler
