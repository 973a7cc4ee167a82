"""The Kubernetes launcher: a fresh Pod per call, talked to through the attach API.

Create the Pod, watch it until it runs (failing fast with Kubernetes' own reason when it cannot:
ImagePullBackOff, CreateContainerConfigError, Unschedulable, ...), attach to its stdin/stdout
without a TTY, run the stdio session, and delete the Pod in every outcome unless told to keep it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from pool.ephemeral.podspec import CONTAINER, RUNNER_SELECTOR, runner_pod
from pool.errors import PodFailed, TaskTimeout
from pool.k8s.api import api_configuration, api_error
from worker import defaults

log = logging.getLogger("runnable_k8s.ephemeral")

# Waiting reasons that will not fix themselves within a call: fail at once with the reason.
FATAL_WAITING_REASONS = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
}


class PodChannel:
    """The attached stdin/stdout of a runner Pod; closing it deletes the Pod."""

    def __init__(self, launcher: KubernetesLauncher, core: client.CoreV1Api, name: str, ws: Any) -> None:
        self.launcher = launcher
        self.core = core
        self.name = name
        self.ws = ws
        self._buffer = ""
        self._closed = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        self.ws.write_stdin(data.decode("ascii"))  # stdio lines are base64: plain ASCII

    def read_line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            newline = self._buffer.find("\n")
            if newline >= 0:
                line, self._buffer = self._buffer[: newline + 1], self._buffer[newline + 1:]
                return line.encode("ascii", "replace")
            if self._closed or not self.ws.is_open():
                line, self._buffer = self._buffer, ""
                return line.encode("ascii", "replace")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            self.ws.update(timeout=min(remaining, 1.0) if remaining is not None else 1.0)
            if self.ws.peek_stdout():
                self._buffer += self.ws.read_stdout()

    def failure(self) -> BaseException:
        return self.launcher.pod_failure(self.core, self.name, "the Pod ended before sending a result")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        self.launcher.delete(self.core, self.name)
        self.core.api_client.close()


class KubernetesLauncher:
    """Starts one runner Pod per call (the default launcher of ephemeral mode)."""

    def __init__(
        self,
        *,
        namespace: str = "default",
        image: str,
        image_pull_policy: str | None = None,
        secret_name: str | None = None,
        delete_pod: bool = True,
        pod_overrides: dict[str, Any] | None = None,
        k8s_config: Any = None,
        start_timeout: float = defaults.EPHEMERAL_START_TIMEOUT,
    ) -> None:
        self.namespace = namespace
        self.image = image
        self.image_pull_policy = image_pull_policy
        self.secret_name = secret_name
        self.delete_pod = delete_pod
        self.pod_overrides = pod_overrides
        self.k8s_config = k8s_config
        self.start_timeout = start_timeout
        self._configuration: client.Configuration | None = None

    def core(self) -> client.CoreV1Api:
        """A client of its own for each call: ``kubernetes.stream.stream`` swaps the ApiClient's
        request method while it attaches, so calls of a batch sharing one would trip over each
        other (kubernetes-client/python#928)."""
        if self._configuration is None:
            self._configuration = api_configuration(self.k8s_config)
        return client.CoreV1Api(client.ApiClient(configuration=self._configuration))

    def manifest(self) -> dict[str, Any]:
        return runner_pod(image=self.image, namespace=self.namespace, image_pull_policy=self.image_pull_policy,
                          secret_name=self.secret_name, overrides=self.pod_overrides)

    def launch(self, deadline: float | None) -> PodChannel:
        core = self.core()
        manifest: Any = self.manifest()  # the client sends a plain dict as it is, like a V1Pod
        name = manifest["metadata"]["name"]
        try:
            core.create_namespaced_pod(self.namespace, manifest)
        except ApiException as exc:
            raise api_error(exc, "create", "pods", self.namespace, error=PodFailed) from exc
        try:
            self._wait_running(core, name, deadline)
            try:
                ws = stream(core.connect_get_namespaced_pod_attach, name, self.namespace, container=CONTAINER,
                            stdin=True, stdout=True, stderr=False, tty=False, _preload_content=False)
            except ApiException as exc:
                raise api_error(exc, "create", "pods/attach", self.namespace, error=PodFailed) from exc
        except BaseException:
            self.delete(core, name)
            raise
        return PodChannel(self, core, name, ws)

    def _wait_running(self, core: client.CoreV1Api, name: str, deadline: float | None) -> None:
        start_deadline = time.monotonic() + self.start_timeout
        limit = min(start_deadline, deadline) if deadline is not None else start_deadline
        watcher = watch.Watch()
        try:
            while True:
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    events = watcher.stream(core.list_namespaced_pod, self.namespace,
                                            field_selector=f"metadata.name={name}",
                                            timeout_seconds=max(1, int(remaining)))
                    for event in events:
                        if event["type"] == "DELETED":
                            raise PodFailed(f"runner Pod {self.namespace}/{name} was deleted before it started",
                                            reason="Deleted", pod_name=name)
                        if self._check_started(event["object"]):
                            return
                except ApiException as exc:
                    raise api_error(exc, "watch", "pods", self.namespace, error=PodFailed) from exc
        finally:
            watcher.stop()
        if deadline is not None and time.monotonic() >= deadline:
            raise TaskTimeout(f"the call's timeout passed while runner Pod {self.namespace}/{name} was starting")
        raise self.pod_failure(core, name, f"the Pod did not start within {self.start_timeout:g}s")

    def _check_started(self, pod: Any) -> bool:
        """True once the Pod runs; raises PodFailed when it cannot get there."""
        status = pod.status
        name = pod.metadata.name
        for condition in status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
                raise PodFailed(f"runner Pod {self.namespace}/{name} cannot be scheduled: {condition.message}",
                                reason="Unschedulable", pod_name=name)
        for container in status.container_statuses or []:
            waiting = container.state.waiting if container.state else None
            if waiting is not None and waiting.reason in FATAL_WAITING_REASONS:
                raise PodFailed(f"runner Pod {self.namespace}/{name} cannot start: {waiting.reason}: {waiting.message}",
                                reason=waiting.reason, pod_name=name)
        if status.phase in ("Failed", "Succeeded"):
            raise self._ended(pod)
        return status.phase == "Running"

    def _ended(self, pod: Any) -> PodFailed:
        name = pod.metadata.name
        for container in pod.status.container_statuses or []:
            terminated = container.state.terminated if container.state else None
            if terminated is not None:
                return PodFailed(
                    f"runner Pod {self.namespace}/{name} ended: {terminated.reason or 'exited'} "
                    f"(exit code {terminated.exit_code}){': ' + terminated.message if terminated.message else ''}",
                    reason=terminated.reason or f"ExitCode{terminated.exit_code}", pod_name=name,
                )
        return PodFailed(f"runner Pod {self.namespace}/{name} ended: {pod.status.reason or pod.status.phase}",
                         reason=pod.status.reason or pod.status.phase, pod_name=name)

    def pod_failure(self, core: client.CoreV1Api, name: str, what: str) -> PodFailed:
        """The most specific reason the API has for a Pod that gave no result."""
        try:
            pod = core.read_namespaced_pod(name, self.namespace)
        except ApiException:
            return PodFailed(f"{what}; runner Pod {self.namespace}/{name} is gone", reason="Gone", pod_name=name)
        try:
            self._check_started(pod)
        except PodFailed as failed:
            return failed
        phase = pod.status.phase if pod.status is not None else None
        return PodFailed(f"{what} (runner Pod {self.namespace}/{name} is {phase or 'in an unknown phase'})",
                         reason=phase, pod_name=name)

    def delete(self, core: client.CoreV1Api, name: str) -> None:
        if not self.delete_pod:
            log.info("keeping runner Pod %s/%s (k8s_delete_runner_pod=False)", self.namespace, name)
            return
        try:
            core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete runner Pod %s/%s: %s %s; `runnable-k8s gc` removes leftovers",
                            self.namespace, name, exc.status, exc.reason)


def delete_leftover_runners(core: client.CoreV1Api, namespace: str, older_than: float) -> list[str]:
    """Delete this project's runner Pods older than ``older_than`` seconds (``runnable-k8s gc``)."""
    now = dt.datetime.now(dt.timezone.utc)
    deleted: list[str] = []
    for pod in core.list_namespaced_pod(namespace, label_selector=RUNNER_SELECTOR).items:
        meta = pod.metadata
        if meta is None or meta.name is None or meta.creation_timestamp is None:
            continue  # the API always sets both; nothing to age or delete without them
        if (now - meta.creation_timestamp).total_seconds() >= older_than:
            try:
                core.delete_namespaced_pod(meta.name, namespace, grace_period_seconds=0)
                deleted.append(meta.name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
    return deleted
