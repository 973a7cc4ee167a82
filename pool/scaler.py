"""Scaling actuators (DESIGN §6): set the worker count of a local pool or of a worker Deployment.

By hand:

    from pool.scaler import scale
    scale("k8s://team-a/my-pool", 3)        # the release's worker Deployment, via its scale subresource
    scale(local_pool, 3)                    # a LocalPool's worker processes (same as local_pool.scale(3))
    scale_deployment(2, namespace="team-a", deployment="my-pool-worker", kubeconfig="~/.kube/config")

or ``runnable-k8s scale 3 --release my-pool --namespace team-a``. The autoscaler
(``pool.autoscaler``) drives the same two classes. A Deployment is scaled through its ``scale``
subresource only, so the identity needs just ``patch`` (and ``get``) on ``deployments/scale``,
never the right to rewrite the Deployment.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from pool.errors import ScalingError

if TYPE_CHECKING:
    from pool.local import LocalPool

WORKER_COMPONENT = "worker"  # the chart's app.kubernetes.io/component of the worker Deployment
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Scaler(Protocol):
    """Something whose worker count can be read and set."""

    def current(self) -> int: ...
    def scale(self, replicas: int) -> None: ...
    def describe(self) -> str: ...


class LocalPoolScaler:
    """A LocalPool's worker process count. ``scale`` never waits: workers drain by themselves."""

    def __init__(self, local_pool: LocalPool) -> None:
        self.pool = local_pool

    def current(self) -> int:
        return self.pool.workers

    def scale(self, replicas: int) -> None:
        self.pool.scale(replicas, wait=False)

    def describe(self) -> str:
        return f"local pool {self.pool.address}"


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
        except Exception as exc:  # noqa: BLE001 - ApiException and connection errors alike
            raise self._error(exc, "get") from exc
        return int(scale.spec.replicas or 0)

    def scale(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        try:
            self.apps.patch_namespaced_deployment_scale(self.name, self.namespace, {"spec": {"replicas": replicas}})
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "patch") from exc

    def describe(self) -> str:
        return f"deployment {self.namespace}/{self.name}"

    def _error(self, exc: Exception, verb: str) -> ScalingError:
        return k8s_error(exc, verb, "deployments/scale", self.namespace, self.name)


def k8s_error(exc: Exception, verb: str, resource: str, namespace: str, name: str | None = None) -> ScalingError:
    """A ScalingError naming the RBAC rule that is missing (403), the object that is (404), or the API
    failure as it came."""
    status = getattr(exc, "status", None)
    what = f"{resource} {name!r}" if name else resource
    if status == 403:
        verbs = ", ".join(repr(v) for v in dict.fromkeys(("get", verb)))
        return ScalingError(
            f"the Kubernetes API refused to {verb} {what} in namespace {namespace!r} (403 Forbidden): "
            f"the identity in use (your kubeconfig's user, or the broker Pod's ServiceAccount) lacks the "
            f"{verb!r} verb on {resource!r}. Grant it with a Role rule {{apiGroups: ['apps'], "
            f"resources: [{resource!r}], verbs: [{verbs}]}} and a RoleBinding (the worker-pool chart "
            "creates them when autoscaling is enabled)"
        )
    if status == 404:
        return ScalingError(f"{what} not found in namespace {namespace!r}: check the name and the namespace")
    if status is not None:
        reason = getattr(exc, "reason", "")
        return ScalingError(f"could not {verb} {what} in namespace {namespace!r}: {status} {reason}")
    return ScalingError(f"could not {verb} {what} in namespace {namespace!r}: {exc}")


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
    except Exception as exc:  # noqa: BLE001
        raise k8s_error(exc, "list", "deployments", namespace) from exc
    if len(items) != 1:
        found = ", ".join(sorted(d.metadata.name for d in items)) or "none"
        raise ScalingError(
            f"expected one worker Deployment of release {release!r} in namespace {namespace!r} (labels {selector}), "
            f"found {found}; pass --deployment NAME (or deployment=) to choose it"
        )
    return str(items[0].metadata.name)


def deployment_scaler(namespace: str | None = None, deployment: str | None = None, release: str | None = None,
                      kubeconfig: Any = None) -> DeploymentScaler:
    """A DeploymentScaler for a named Deployment or a release's worker Deployment.

    ``kubeconfig``: a path, a ``kubernetes.client.Configuration``, an ``ApiClient``, or None
    (in-cluster config inside a Pod, else the default kubeconfig)."""
    from kubernetes.client import ApiClient

    from pool.k8s_launcher import api_client as make_api_client

    if (deployment is None) == (release is None):
        raise ValueError("name the Deployment (deployment=...) or the chart release (release=...), not both")
    if isinstance(kubeconfig, str):
        kubeconfig = os.path.expanduser(kubeconfig)
    namespace = namespace or default_namespace(kubeconfig)
    try:
        client = kubeconfig if isinstance(kubeconfig, ApiClient) else make_api_client(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - kubeconfig missing or unreadable
        raise ScalingError(f"no Kubernetes configuration: {exc}. Pass --kubeconfig PATH or set KUBECONFIG") from exc
    name = deployment or find_worker_deployment(client, namespace, release or "")
    return DeploymentScaler(namespace, name, client)


def scale_deployment(replicas: int, *, namespace: str | None = None, deployment: str | None = None,
                     release: str | None = None, kubeconfig: Any = None) -> DeploymentScaler:
    """Set a worker Deployment's replicas (scale subresource); returns the scaler used."""
    scaler = deployment_scaler(namespace, deployment, release, kubeconfig)
    scaler.scale(replicas)
    return scaler


def scale(target: LocalPool | str, replicas: int, *, kubeconfig: Any = None) -> None:
    """Set the worker count of a pool: a ``LocalPool``, or ``"k8s://NAMESPACE/RELEASE"`` (the
    release's worker Deployment). Scaling down loses no task: removed workers drain first."""
    if isinstance(target, str):
        if not target.startswith("k8s://") or target.count("/") != 3:
            raise ValueError(f"expected k8s://NAMESPACE/RELEASE or a LocalPool, got {target!r}")
        namespace, release = target[len("k8s://"):].split("/")
        scale_deployment(replicas, namespace=namespace, release=release, kubeconfig=kubeconfig)
    else:
        LocalPoolScaler(target).scale(replicas)
