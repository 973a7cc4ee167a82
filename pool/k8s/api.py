"""One way to build a Kubernetes API client, and one way to explain its refusals.

``k8s_config`` is what the original RunnableK8s took: a ``kubernetes.client.Configuration``, a
kubeconfig path, or None (in-cluster config inside a Pod, else the default kubeconfig). Every
refusal becomes the error class of the operation that failed (``PodFailed`` for a runner Pod,
``ScalingError`` for a Deployment's scale, ``PoolUnavailable`` for a port-forward, ...), and a
403 names the Role rule that would allow it, because that is what the user has to write next.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from kubernetes import client, config

from pool.errors import PodFailed, RunnableK8sError

E = TypeVar("E", bound=RunnableK8sError)


def api_configuration(k8s_config: Any = None) -> client.Configuration:
    """A Configuration from ``k8s_config`` (see the module's docstring)."""
    if isinstance(k8s_config, client.Configuration) and k8s_config.host != client.Configuration().host:
        return k8s_config
    configuration = k8s_config if isinstance(k8s_config, client.Configuration) else client.Configuration()
    try:
        if k8s_config is None:
            config.load_incluster_config(client_configuration=configuration)
            return configuration
    except config.ConfigException:
        pass
    config_file = os.path.expanduser(k8s_config) if isinstance(k8s_config, str) else None
    config.load_kube_config(config_file=config_file, client_configuration=configuration)
    return configuration


def api_client(k8s_config: Any = None) -> client.ApiClient:
    """A new ApiClient (an ``ApiClient`` passed in is used as it is)."""
    if isinstance(k8s_config, client.ApiClient):
        return k8s_config
    return client.ApiClient(configuration=api_configuration(k8s_config))


def api_error(
    exc: BaseException,
    verb: str,
    resource: str,
    namespace: str,
    *,
    error: type[E],
    name: str | None = None,
    api_group: str = "",
    granted_by: str = "your kubeconfig's user, or the Pod's ServiceAccount",
) -> E:
    """``error`` explaining why the API refused ``verb`` on ``resource``: the missing RBAC rule
    (403), the missing object (404), or the failure as it came (other statuses, connection errors)."""
    status = getattr(exc, "status", None)
    what = f"{resource} {name!r}" if name else resource
    if status == 403:
        verbs = ", ".join(repr(v) for v in dict.fromkeys(("get", verb) if name else (verb,)))
        message = (
            f"the Kubernetes API refused to {verb} {what} in namespace {namespace!r} (403 Forbidden): "
            f"the identity in use ({granted_by}) lacks the {verb!r} verb on {resource!r}. Grant it with a "
            f"Role rule {{apiGroups: [{api_group!r}], resources: [{resource!r}], verbs: [{verbs}]}} and a RoleBinding"
        )
        reason = "Forbidden"
    elif status == 404:
        message = f"{what} not found in namespace {namespace!r}: check the name and the namespace"
        reason = "NotFound"
    elif status is not None:
        reason = str(getattr(exc, "reason", "") or status)
        message = f"could not {verb} {what} in namespace {namespace!r}: {status} {getattr(exc, 'reason', '')}"
    else:
        reason = type(exc).__name__
        message = f"could not {verb} {what} in namespace {namespace!r}: {exc}"
    if issubclass(error, PodFailed):
        return error(message, reason=reason, pod_name=name)
    return error(message)
