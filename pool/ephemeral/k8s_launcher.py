"""The Kubernetes launcher: a fresh Pod per call, talked to through the attach API.

Create the Pod, watch it until it runs (failing fast with Kubernetes' own reason when it cannot:
ImagePullBackOff, CreateContainerConfigError, Unschedulable, ...), attach to its stdin/stdout
without a TTY, run the stdio session, and delete the Pod in every outcome unless told to keep it.

This module holds the policy (the manifest, how long a call waits for its Pod, when a Pod is
deleted); the API calls are in ``pool.k8s.runner_pods`` (create, watch, read, delete, list) and
``pool.k8s.attach`` (the attach stream). ``PodChannel``, ``FATAL_WAITING_REASONS`` and the gc
names (``delete_leftover_runners``, ``select_leftover_runners``, ...: ``pool.ephemeral.gc``) are
still importable from here.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pool.ephemeral.gc import (
    GcDecision,
    delete_leftover_runners,
    owner_alive_here,
    pid_alive,
    select_leftover_runners,
)
from pool.ephemeral.podspec import CONTAINER, OWNER_LABEL, active_deadline, owner_id, runner_pod
from pool.errors import PodFailed, TaskTimeout
from pool.k8s import runner_pods
from pool.k8s.api import api_configuration
from pool.k8s.attach import SMALL_WRITE_BYTES, PodChannel, attach
from pool.k8s.runner_pods import FATAL_WAITING_REASONS
from worker import defaults

log = logging.getLogger("runnable_k8s.ephemeral")

__all__ = [
    "FATAL_WAITING_REASONS",
    "SMALL_WRITE_BYTES",
    "GcDecision",
    "KubernetesLauncher",
    "PodChannel",
    "delete_leftover_runners",
    "owner_alive_here",
    "pid_alive",
    "select_leftover_runners",
]


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
        self._configuration: Any = None

    def core(self) -> Any:
        """A CoreV1Api of its own for each call (``pool.k8s.runner_pods.core_api`` says why); the
        configuration is read once."""
        if self._configuration is None:
            self._configuration = api_configuration(self.k8s_config)
        return runner_pods.core_api(self._configuration)

    def manifest(self, deadline: float | None = None) -> dict[str, Any]:
        """The runner Pod for a call ending at ``deadline`` (``time.monotonic()``; None: no
        timeout): its activeDeadlineSeconds is what is left of the call's timeout plus a margin."""
        remaining = None if deadline is None else deadline - time.monotonic()
        return runner_pod(image=self.image, namespace=self.namespace, image_pull_policy=self.image_pull_policy,
                          secret_name=self.secret_name, active_deadline_seconds=active_deadline(remaining),
                          keep=not self.delete_pod, overrides=self.pod_overrides)

    def launch(self, deadline: float | None) -> PodChannel:
        core = self.core()
        _log_owner_once()
        name = runner_pods.create(core, self.namespace, self.manifest(deadline))
        try:
            self.wait_running(core, name, deadline)
            ws = attach(core, self.namespace, name, CONTAINER)
        except BaseException:
            self.delete(core, name)
            raise
        return PodChannel(self, core, name, ws, deadline)

    def wait_running(self, core: Any, name: str, deadline: float | None) -> None:
        """Wait until Pod ``name`` runs: at most ``start_timeout``, and never past the call's
        ``deadline`` (then ``TaskTimeout``). ``PodFailed`` when it cannot start, or did not in time."""
        start_deadline = time.monotonic() + self.start_timeout
        limit = min(start_deadline, deadline) if deadline is not None else start_deadline
        if runner_pods.wait_running(core, self.namespace, name, limit):
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise TaskTimeout(f"the call's timeout passed while runner Pod {self.namespace}/{name} was starting")
        raise self.pod_failure(core, name, f"the Pod did not start within {self.start_timeout:g}s")

    def pod_failure(self, core: Any, name: str, what: str) -> PodFailed:
        """The most specific reason the API has for a Pod that gave no result."""
        return runner_pods.failure(core, self.namespace, name, what)

    def delete(self, core: Any, name: str) -> None:
        if not self.delete_pod:
            log.info("keeping runner Pod %s/%s (k8s_delete_runner_pod=False)", self.namespace, name)
            return
        runner_pods.delete_or_warn(core, self.namespace, name)


_owner_logged: set[int] = set()


def _log_owner_once() -> None:
    pid = os.getpid()
    if pid not in _owner_logged:
        _owner_logged.add(pid)
        log.info("runner Pods of this process carry the label %s=%s (`runnable-k8s gc --owner %s` "
                 "removes them if this process dies before it can)", OWNER_LABEL, owner_id(), owner_id())
