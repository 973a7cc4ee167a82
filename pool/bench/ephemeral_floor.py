"""The floors of ephemeral mode, measured by ``runnable-k8s bench`` in the same run as its calls
(a call is judged against what a fresh worker cannot go below on the same machine under the same
load), one of each after each of ephemeral mode's sequential calls (:func:`interleaved`).

A fresh worker per call cannot cost less than

* starting Python with LangChain: ``python -c "import langchain_core.runnables"`` with the
  bench's own interpreter (:func:`timed_start`). langchain-core 1.x imports that package lazily,
  so this start does not load ``Runnable`` itself, nor the callbacks, tracers and langsmith
  client that any ``Runnable.invoke`` needs; the bench therefore also times a start that runs one
  ``RunnableLambda`` (:data:`RUNNABLE_START`), the least a process that runs a Runnable does;
* on Kubernetes, a Pod's start: create -> phase Running of a minimal Pod, the runner Pods' own
  manifest and image with a command that only sleeps, watched like a runner Pod and deleted after
  (:func:`time_pod_start`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BARE_START = "import langchain_core.runnables"
RUNNABLE_START = "from langchain_core.runnables import RunnableLambda; RunnableLambda(lambda x: x).invoke(1)"
POD_FLOOR_COMMAND = ["sleep", "600"]  # the worker image has coreutils; killed by the delete


def timed_start(code: str, python: str = sys.executable) -> float:
    """Seconds ``python -c CODE`` took from spawn to exit (it must succeed)."""
    started = time.perf_counter()
    subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - started


def interleaved(call: Callable[[], Any], probes: dict[str, Callable[[], float]], calls: int, warmup: int,
                tick: Callable[[str], None] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds each of ``calls`` sequential ``call()`` took (after ``warmup`` untimed ones), with
    one run of each floor probe (returning its own seconds) after each call: on a machine shared
    with others, a call and its floors are then measured under the same load."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    floors: dict[str, list[float]] = {key: [] for key in probes}
    for i in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
        for key, probe in probes.items():
            floors[key].append(probe())
        if tick is not None:
            tick(f"call {i + 1}/{calls} and its floors")
    return samples, floors


def floor_pod_manifest(launcher: Any) -> dict[str, Any]:
    """A runner Pod of ``launcher`` (a :class:`~pool.ephemeral.k8s_launcher.KubernetesLauncher`:
    same image, pull policy, labels, security context and overrides) that only sleeps."""
    manifest: dict[str, Any] = launcher.manifest(None)
    container = manifest["spec"]["containers"][0]
    container["command"] = list(POD_FLOOR_COMMAND)
    container["stdin"] = container["stdinOnce"] = False
    manifest["spec"]["activeDeadlineSeconds"] = 120
    return manifest


def time_pod_start(launcher: Any) -> float:
    """Seconds from create to phase Running of one minimal Pod (then deleted, in every outcome).
    The API calls are the runner Pods' own (``pool.k8s.runner_pods``), watched the same way."""
    from pool.k8s import runner_pods

    core = launcher.core()
    try:
        started = time.perf_counter()
        name = runner_pods.create(core, launcher.namespace, floor_pod_manifest(launcher))
        try:
            launcher.wait_running(core, name, None)  # the runner Pods' own wait, up to its start timeout
            return time.perf_counter() - started
        finally:
            runner_pods.delete(core, launcher.namespace, name)
    finally:
        runner_pods.close(core)


def pod_floor(launcher: Any, runs: int, tick: Callable[[str], None] | None = None) -> list[float]:
    """Seconds each of ``runs`` sequential minimal Pods took from create to Running."""
    samples = []
    for i in range(runs):
        if tick is not None:
            tick(f"Pod {i + 1}/{runs}")
        samples.append(time_pod_start(launcher))
    return samples
