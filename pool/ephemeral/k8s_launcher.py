"""The Kubernetes launcher: a fresh Pod per call, talked to through the attach API.

Create the Pod, watch it until it runs (failing fast with Kubernetes' own reason when it cannot:
ImagePullBackOff, CreateContainerConfigError, Unschedulable, ...), attach to its stdin/stdout
without a TTY, run the stdio session, and delete the Pod in every outcome unless told to keep it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from pool.ephemeral.podspec import (
    CONTAINER,
    KEEP_LABEL,
    OWNER_LABEL,
    RUNNER_SELECTOR,
    active_deadline,
    host_label,
    owner_id,
    parse_owner,
    runner_pod,
)
from pool.errors import PodFailed, TaskTimeout
from pool.k8s.api import api_configuration, api_error
from worker import defaults
from worker.stdio_lines import take_line

log = logging.getLogger("runnable_k8s.ephemeral")

# Writes up to this size fit the buffers between here and the worker's stdin: sent directly.
SMALL_WRITE_BYTES = 64 * 1024

# Waiting reasons that will not fix themselves within a call: fail at once with the reason.
FATAL_WAITING_REASONS = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
}


class PodChannel:
    """The attached stdin/stdout of a runner Pod; closing it deletes the Pod."""

    def __init__(self, launcher: KubernetesLauncher, core: client.CoreV1Api, name: str, ws: Any,
                 deadline: float | None = None) -> None:
        self.launcher = launcher
        self.core = core
        self.name = name
        self.ws = ws
        self.deadline = deadline  # the call's (time.monotonic()), for writes the worker does not take
        self._buffer = bytearray()
        self._closed = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Send ``data`` to the worker's stdin (stdio lines are base64: plain ASCII).

        The session sends the TASK while the worker is still starting: a large one can wait in the
        attach stream until the worker reads it, so it is sent from a helper thread and the call's
        deadline still applies (``TimeoutError``; the session then closes the stream, which ends
        the helper's send)."""
        text = data.decode("ascii")
        if self.deadline is None or len(data) <= SMALL_WRITE_BYTES:
            self.ws.write_stdin(text)
            return
        failed: list[BaseException] = []

        def send() -> None:
            try:
                self.ws.write_stdin(text)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                failed.append(exc)

        sender = threading.Thread(target=send, daemon=True, name=f"runnable-k8s-attach-{self.name}")
        sender.start()
        sender.join(max(0.0, self.deadline - time.monotonic()))
        if sender.is_alive():
            raise TimeoutError()
        if failed:
            raise failed[0]

    def read_line(self, timeout: float | None) -> bytes:
        """The next line of the Pod's stdout; ``LineTooLong`` (nothing more is read) for one over
        the stdio line limit, so an endless line cannot fill this process's memory."""
        deadline = None if timeout is None else time.monotonic() + timeout
        searched = 0  # the buffer's first bytes hold no newline: not searched again
        while True:
            line = take_line(self._buffer, "the one-shot worker's Pod", searched)
            if line is not None:
                return line
            searched = len(self._buffer)
            if self._closed or not self.ws.is_open():
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            self.ws.update(timeout=min(remaining, 1.0) if remaining is not None else 1.0)
            if self.ws.peek_stdout():
                # Stdio lines are base64: plain ASCII. Anything else is not ours and is replaced.
                self._buffer += self.ws.read_stdout().encode("ascii", "replace")
                self._drop_capture()

    def _drop_capture(self) -> None:
        """The kubernetes client also keeps a copy of all the output it reads (for its
        ``read_all``), which ``stream()`` gives no way to turn off: dropped as it comes, or a long
        stream (or a worker writing lines forever) would keep all of it in memory. ``read_all`` also
        empties the client's other channels: stdout was just read, and nothing here reads another
        (stderr is not attached; a failure is read from the Pod's status)."""
        try:
            self.ws.read_all()
        except TypeError:  # a client made with capture_all=False keeps nothing
            pass

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

    def manifest(self, deadline: float | None = None) -> dict[str, Any]:
        """The runner Pod for a call ending at ``deadline`` (``time.monotonic()``; None: no
        timeout): its activeDeadlineSeconds is what is left of the call's timeout plus a margin."""
        remaining = None if deadline is None else deadline - time.monotonic()
        return runner_pod(image=self.image, namespace=self.namespace, image_pull_policy=self.image_pull_policy,
                          secret_name=self.secret_name, active_deadline_seconds=active_deadline(remaining),
                          keep=not self.delete_pod, overrides=self.pod_overrides)

    def launch(self, deadline: float | None) -> PodChannel:
        core = self.core()
        manifest: Any = self.manifest(deadline)  # the client sends a plain dict as it is, like a V1Pod
        _log_owner_once()
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
        return PodChannel(self, core, name, ws, deadline)

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


_owner_logged: set[int] = set()


def _log_owner_once() -> None:
    pid = os.getpid()
    if pid not in _owner_logged:
        _owner_logged.add(pid)
        log.info("runner Pods of this process carry the label %s=%s (`runnable-k8s gc --owner %s` "
                 "removes them if this process dies before it can)", OWNER_LABEL, owner_id(), owner_id())


# ---------------------------------------------------------------------------- runnable-k8s gc
@dataclass(frozen=True)
class GcDecision:
    name: str
    delete: bool
    why: str


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    except OSError:
        return False
    return True


def owner_alive_here(owner: str | None, this_host: str, alive: Callable[[int], bool]) -> bool:
    """True when ``owner`` names a process of this host that still runs (pid reuse can make a dead
    owner look alive: then gc keeps the Pod, the safe mistake)."""
    parsed = parse_owner(owner) if owner else None
    return parsed is not None and bool(parsed[0]) and parsed[0] == this_host and alive(parsed[1])


def select_leftover_runners(
    pods: Iterable[Any],
    *,
    now: dt.datetime,
    older_than: float = defaults.GC_OLDER_THAN,
    owner: str | None = None,
    all_owners: bool = False,
    this_host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> list[GcDecision]:
    """Which runner Pods `runnable-k8s gc` deletes, and why (a pure function of the Pods, the
    time and the process table, so that it can be tested without a cluster).

    gc runs in another process than the clients that made the Pods, so "leftover" means:

    * never a Pod labelled ``runnable-k8s.io/keep: "true"`` (kept on purpose with
      ``k8s_delete_runner_pod=False``; delete it with kubectl);
    * by default, a Pod whose owner is gone: older than ``older_than`` *and* than its own
      activeDeadlineSeconds + GC_DEADLINE_MARGIN (Kubernetes has stopped it by then, so no call
      can still use it), and whose owner label does not name a process that still runs on this
      host. Pods of owners on other hosts are judged by age alone: their process table is not ours;
    * with ``owner``, that owner's Pods older than ``older_than`` whatever their deadline (you say
      that process is gone; pass ``older_than=0`` to take them all at once);
    * with ``all_owners``, every owner's Pods older than ``older_than``, whatever their deadline
      and whether their owner runs (this can stop a running call whose timeout is longer).
    """
    host = host_label() if this_host is None else this_host
    decisions = []
    for pod in pods:
        meta = pod.metadata
        if meta is None or meta.name is None or meta.creation_timestamp is None:
            continue  # the API always sets both; nothing to age or delete without them
        labels = meta.labels or {}
        age = (now - meta.creation_timestamp).total_seconds()
        pod_owner = labels.get(OWNER_LABEL)
        if labels.get(KEEP_LABEL) == "true":
            decisions.append(GcDecision(meta.name, False, "kept on purpose (k8s_delete_runner_pod=False)"))
            continue
        if age < older_than:
            decisions.append(GcDecision(meta.name, False, f"younger than {older_than:g}s"))
            continue
        if owner is not None:
            if pod_owner == owner:
                decisions.append(GcDecision(meta.name, True, f"owner {owner}, older than {older_than:g}s"))
            else:
                decisions.append(GcDecision(meta.name, False, f"owner {pod_owner or 'unknown'}, not {owner}"))
            continue
        if all_owners:
            decisions.append(GcDecision(meta.name, True, f"older than {older_than:g}s (--all-owners)"))
            continue
        spec = getattr(pod, "spec", None)
        deadline = getattr(spec, "active_deadline_seconds", None)
        if deadline is None:
            deadline = defaults.EPHEMERAL_ACTIVE_DEADLINE
        limit = deadline + defaults.GC_DEADLINE_MARGIN
        if age < limit:
            decisions.append(GcDecision(meta.name, False, f"within its deadline ({deadline}s + margin)"))
        elif owner_alive_here(pod_owner, host, alive):
            decisions.append(GcDecision(meta.name, False, f"its owner {pod_owner} still runs on this host"))
        else:
            decisions.append(GcDecision(meta.name, True, f"past its deadline ({deadline}s + margin), "
                                                         f"owner {pod_owner or 'unknown'} gone"))
    return decisions


def delete_leftover_runners(
    core: client.CoreV1Api,
    namespace: str,
    older_than: float = defaults.GC_OLDER_THAN,
    *,
    owner: str | None = None,
    all_owners: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Delete this project's leftover runner Pods (``runnable-k8s gc``); returns their names.

    Only Pods of ``namespace`` matching ``RUNNER_SELECTOR`` (app.kubernetes.io/managed-by=runnable-k8s,
    runnable-k8s/role=ephemeral-runner: the labels of ephemeral mode's runner Pods, which the
    chart's broker and worker Pods never carry) are listed; :func:`select_leftover_runners` says
    which of them go. Each is deleted with a grace period of 0."""
    pods = core.list_namespaced_pod(namespace, label_selector=RUNNER_SELECTOR).items
    deleted: list[str] = []
    for decision in select_leftover_runners(pods, now=dt.datetime.now(dt.timezone.utc), older_than=older_than,
                                            owner=owner, all_owners=all_owners):
        log.debug("gc %s/%s: %s (%s)", namespace, decision.name, "delete" if decision.delete else "keep",
                  decision.why)
        if not decision.delete:
            continue
        if dry_run:
            deleted.append(decision.name)
            continue
        try:
            core.delete_namespaced_pod(decision.name, namespace, grace_period_seconds=0)
            deleted.append(decision.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    return deleted
