"""Ephemeral mode's runner Pods through the Kubernetes API: create one, watch it until it runs,
read why it failed, delete it, and list the runner Pods of a namespace for ``runnable-k8s gc``.

What to do with a Pod (its manifest, how long a call may wait, when to delete, which leftovers gc
takes) is decided by the callers (``pool.ephemeral.k8s_launcher``, ``pool.ephemeral.gc``, the
bench's Pod floor); this module only speaks to the API and reads what a Pod's status says. Every
refusal becomes a ``PodFailed`` naming what to grant or fix (``pool.k8s.api.api_error``), except
in :func:`delete` and :func:`list_runner_pods`, which raise the client's ``ApiException`` as it
came for ``runnable-k8s gc`` to explain.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from pool.ephemeral.podspec import RUNNER_SELECTORS
from pool.errors import PodFailed
from pool.k8s.api import api_error

log = logging.getLogger("runnable_k8s.ephemeral")

# Waiting reasons that will not fix themselves within a call: fail at once with the reason.
FATAL_WAITING_REASONS = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
}


def core_api(configuration: Any) -> client.CoreV1Api:
    """A CoreV1Api on an ApiClient of its own (close it with :func:`close`): ``attach`` swaps the
    ApiClient's request method while it connects, so calls sharing one would trip over each other
    (kubernetes-client/python#928)."""
    return client.CoreV1Api(client.ApiClient(configuration=configuration))


def close(core: client.CoreV1Api) -> None:
    """Release ``core``'s connection pool."""
    core.api_client.close()


def create(core: client.CoreV1Api, namespace: str, manifest: dict[str, Any]) -> str:
    """Create the Pod of ``manifest`` (a plain dict: the client sends it as it is, like a V1Pod);
    returns its name."""
    body: Any = manifest
    try:
        core.create_namespaced_pod(namespace, body)
    except ApiException as exc:
        raise api_error(exc, "create", "pods", namespace, error=PodFailed) from exc
    return str(manifest["metadata"]["name"])


def wait_running(core: client.CoreV1Api, namespace: str, name: str, limit: float) -> bool:
    """Watch Pod ``name`` until it runs (True) or ``limit`` (``time.monotonic()``) passes (False).

    Raises ``PodFailed`` with Kubernetes' own reason as soon as the Pod cannot get there: deleted,
    unschedulable, an image that cannot be pulled, a container that cannot be created, ended."""
    watcher = watch.Watch()
    try:
        while True:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                return False
            try:
                events = watcher.stream(core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                                        timeout_seconds=max(1, int(remaining)))
                for event in events:
                    if event["type"] == "DELETED":
                        raise PodFailed(f"runner Pod {namespace}/{name} was deleted before it started",
                                        reason="Deleted", pod_name=name)
                    if started(event["object"], namespace):
                        return True
            except ApiException as exc:
                raise api_error(exc, "watch", "pods", namespace, error=PodFailed) from exc
    finally:
        watcher.stop()


def started(pod: Any, namespace: str) -> bool:
    """True once ``pod`` (a V1Pod) runs; raises ``PodFailed`` when it cannot get there."""
    status = pod.status
    name = pod.metadata.name
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            raise PodFailed(f"runner Pod {namespace}/{name} cannot be scheduled: {condition.message}",
                            reason="Unschedulable", pod_name=name)
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in FATAL_WAITING_REASONS:
            raise PodFailed(f"runner Pod {namespace}/{name} cannot start: {waiting.reason}: {waiting.message}",
                            reason=waiting.reason, pod_name=name)
    if status.phase in ("Failed", "Succeeded"):
        raise ended(pod, namespace)
    return bool(status.phase == "Running")


def ended(pod: Any, namespace: str) -> PodFailed:
    """Why ``pod``, which has stopped, stopped: its container's exit, else the Pod's reason."""
    name = pod.metadata.name
    for container in pod.status.container_statuses or []:
        terminated = container.state.terminated if container.state else None
        if terminated is not None:
            return PodFailed(
                f"runner Pod {namespace}/{name} ended: {terminated.reason or 'exited'} "
                f"(exit code {terminated.exit_code}){': ' + terminated.message if terminated.message else ''}",
                reason=terminated.reason or f"ExitCode{terminated.exit_code}", pod_name=name,
            )
    return PodFailed(f"runner Pod {namespace}/{name} ended: {pod.status.reason or pod.status.phase}",
                     reason=pod.status.reason or pod.status.phase, pod_name=name)


def failure(core: client.CoreV1Api, namespace: str, name: str, what: str) -> PodFailed:
    """The most specific reason the API has for Pod ``name``, which gave no result (``what``)."""
    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException:
        return PodFailed(f"{what}; runner Pod {namespace}/{name} is gone", reason="Gone", pod_name=name)
    try:
        started(pod, namespace)
    except PodFailed as failed:
        return failed
    phase = pod.status.phase if pod.status is not None else None
    return PodFailed(f"{what} (runner Pod {namespace}/{name} is {phase or 'in an unknown phase'})",
                     reason=phase, pod_name=name)


def delete(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    """Delete Pod ``name`` now (grace period 0). False when it was already gone; any other refusal
    raises the client's ``ApiException``."""
    try:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def delete_or_warn(core: client.CoreV1Api, namespace: str, name: str) -> None:
    """:func:`delete`, logging a refusal instead of raising it: the call that used the Pod is over
    either way, and ``runnable-k8s gc`` removes what is left."""
    try:
        delete(core, namespace, name)
    except ApiException as exc:
        log.warning("could not delete runner Pod %s/%s: %s %s; `runnable-k8s gc` removes leftovers",
                    namespace, name, exc.status, exc.reason)


def list_runner_pods(core: client.CoreV1Api, namespace: str) -> list[Any]:
    """Every runner Pod of ``namespace`` (V1Pods), once each: those this release labels
    (``RUNNER_SELECTOR``) and those of older releases, labelled with the role key before it moved
    under runnable-k8s.io/ (``LEGACY_RUNNER_SELECTOR``). A label selector cannot say "this key or
    that one", so there is one list call per selector."""
    pods: dict[str, Any] = {}
    for selector in RUNNER_SELECTORS:
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            key = pod.metadata.name if pod.metadata is not None and pod.metadata.name else str(id(pod))
            pods.setdefault(key, pod)
    return list(pods.values())
