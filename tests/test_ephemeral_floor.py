"""Ephemeral mode close to its own floor (a fresh worker per call costs little more than starting
one): the one-shot worker imports only what the task needs, the client sends HELLO and the TASK
while the worker starts, and ``runnable-k8s bench`` measures the floors (Python + langchain_core's
start; a minimal Pod's create -> Running) in the same run as ephemeral mode. No timed assertions:
speed is the bench's business."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s, TaskTimeout
from pool.bench import ephemeral_floor
from pool.bench.command import Bench, add_arguments, summarize
from pool.bench.report import format_table
from pool.client.calls import RemoteCall, encode_input, encode_runnable
from pool.ephemeral.local_launcher import ProcessChannel
from pool.ephemeral.session import EphemeralBackend

# What only the warm worker (or the client) uses: a one-shot worker that imports it pays for it
# on every call.
WARM_ONLY = ("zmq", "worker.warm", "worker.transport", "worker.health", "worker.curve", "worker.tasks",
             "kubernetes", "pool")


@pytest.mark.timeout(120)
def test_the_one_shot_worker_imports_nothing_only_the_warm_worker_needs() -> None:
    """A real task through the real local launcher (`python -m worker --stdio`), which reports
    the modules loaded in the worker while it runs."""
    import os

    def loaded_modules(_: object) -> list[str]:  # local: travels by value, imports nothing of this file
        import os
        import sys

        return [str(os.getpid()), *sorted(sys.modules)]

    remote = RunnableK8s(bound=RunnableLambda(loaded_modules), mode="ephemeral", launcher="local", timeout=100)
    pid, *modules = remote.invoke(None)
    assert int(pid) != os.getpid()
    assert "worker.stdio" in modules and "worker.codec" in modules
    assert not any(m.startswith("tests") for m in modules)  # the check itself loaded nothing
    loaded = [m for m in modules if m.split(".")[0] in WARM_ONLY or m in WARM_ONLY]
    assert loaded == []


class ScriptLauncher:
    """Launches ``python -c SCRIPT`` as the one-shot worker (and remembers its process)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.procs: list[subprocess.Popen[bytes]] = []

    def launch(self, deadline: float | None) -> ProcessChannel:
        proc = subprocess.Popen([sys.executable, "-c", self.script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return ProcessChannel(proc, deadline)


# Reads HELLO *and* the TASK before it answers READY: only a client that sends the TASK without
# waiting for READY gets an answer (a client that waits would time out).
READS_BOTH_FIRST = """
import sys
from worker import codec
from worker import protocol as P
stdin, out = sys.stdin.buffer, sys.stdout.buffer
hello, task = P.parse_stdio_line(stdin.readline()), P.parse_stdio_line(stdin.readline())
assert hello[0] == P.HELLO and task[0] == P.TASK, (hello, task)
out.write(P.stdio_line(P.READY, P.encode_json(P.environment())))
# The input, (value, kwargs), as the result: decoded, and sent back as data as a worker does.
out.write(P.stdio_line(P.RESULT, codec.dumps_result(codec.loads(task[1][2]))))
out.flush()
"""


def _call(value: object, timeout: float) -> RemoteCall:
    blob, digest = encode_runnable(RunnableLambda(len))
    return RemoteCall(blob, digest, encode_input(value, {}), timeout=timeout)


@pytest.mark.timeout(60)
def test_hello_and_the_task_reach_the_worker_before_it_answers_ready() -> None:
    launcher = ScriptLauncher(READS_BOTH_FIRST)
    assert EphemeralBackend(launcher).invoke(_call("abc", timeout=30)) in (("abc", {}), ["abc", {}])
    assert all(proc.poll() is not None for proc in launcher.procs)


@pytest.mark.timeout(60)
def test_a_task_bigger_than_the_pipe_does_not_block_past_the_timeout() -> None:
    """The TASK now goes out while the worker starts: one that never reads its stdin must still
    end in TaskTimeout at the call's timeout, with its process stopped."""
    launcher = ScriptLauncher("import time; time.sleep(60)")
    with pytest.raises(TaskTimeout):
        EphemeralBackend(launcher).invoke(_call(b"x" * (1 << 20), timeout=1.0))
    assert [proc.poll() is not None for proc in launcher.procs] == [True]


# ---------------------------------------------------------------------------- the bench's floors


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.timeout(120)
def test_the_bench_measures_the_start_floors_after_each_call() -> None:
    bench = Bench(_bench_args("--modes", "ephemeral", "--launcher", "local"))
    probes = bench.ephemeral_floor_probes()
    assert set(probes) == {"bare_start", "runnable_start"}  # no Pod floor with the local launcher
    assert probes["bare_start"][0] == 'python -c "import langchain_core.runnables"'
    assert "RunnableLambda(lambda x: x).invoke(1)" in probes["runnable_start"][0]
    bare = probes["bare_start"][1]  # the real start, with this interpreter (the other: seconds when busy)
    calls: list[int] = []
    samples, floors = ephemeral_floor.interleaved(lambda: calls.append(len(calls)), {"bare_start": bare},
                                                  calls=2, warmup=1)
    assert calls == [0, 1, 2] and len(samples) == 2
    assert len(floors["bare_start"]) == 2 and all(s > 0 for s in floors["bare_start"])


def _figures(p50: float) -> dict:
    return {"p50_ms": p50, "p95_ms": p50, "p99_ms": p50, "mean_ms": p50, "calls": 3,
            "throughput_per_s": 1000 / p50, "throughput_by_concurrency": {"1": 1000 / p50}}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("launcher", ["local", "kubernetes"])
def test_the_report_shows_each_floor_and_the_ratio_to_it(launcher: str) -> None:
    floor = {"workload": "echo",
             "bare_start": {**_figures(200.0), "command": 'python -c "import langchain_core.runnables"'},
             "runnable_start": {**_figures(400.0), "command": "python -c ..."}}
    if launcher == "kubernetes":
        floor["pod_start"] = {**_figures(1000.0), "command": "sleep 600"}
    results: dict = {
        "in_process": {"workloads": {"echo": _figures(0.1)}},
        "modes": {"ephemeral": {"launcher": launcher, "floor": floor, "workloads": {"echo": _figures(500.0)}}},
        "settings": {"concurrency": [1], "launcher": launcher}, "environment": {},
    }
    summarize(results)
    ratios = results["ratios"]
    assert ratios["ephemeral_p50_over_bare_python_start"] == {"echo": 2.5}
    assert ratios["ephemeral_p50_over_runnable_python_start"] == {"echo": 1.25}
    goal = results["goals"]["ephemeral_p50_over_its_floor"]
    if launcher == "kubernetes":
        assert ratios["ephemeral_p50_over_minimal_pod_start"] == {"echo": 0.5}
        assert goal["measured"] == 0.5 and goal["met"]
    else:
        assert "ephemeral_p50_over_minimal_pod_start" not in ratios
        assert goal["measured"] == 2.5 and not goal["met"]
    table = format_table(results)
    assert "floor: python + langchain_core" in table and "floor: python + a RunnableLambda" in table
    assert ("floor: minimal Pod -> Running" in table) == (launcher == "kubernetes")
    assert "ephemeral p50 over bare python start" in table and "goal <= 1.3x" in table


@pytest.mark.timeout(30)
def test_the_minimal_pod_is_a_sleeping_runner_pod() -> None:
    from pool.ephemeral.k8s_launcher import KubernetesLauncher
    from pool.ephemeral.podspec import RUNNER_SELECTOR

    launcher = KubernetesLauncher(namespace="ns", image="runnable-k8s-worker:test", image_pull_policy="Never")
    manifest = ephemeral_floor.floor_pod_manifest(launcher)
    runner = launcher.manifest(None)
    container, runner_container = manifest["spec"]["containers"][0], runner["spec"]["containers"][0]
    assert container["command"] == ["sleep", "600"] and not container["stdin"]
    assert container["image"] == runner_container["image"] == "runnable-k8s-worker:test"
    assert container["securityContext"] == runner_container["securityContext"]
    key, value = RUNNER_SELECTOR.split(",")[0].split("=")
    assert manifest["metadata"]["labels"][key] == value  # `runnable-k8s gc` finds a leftover
    assert manifest["spec"]["activeDeadlineSeconds"] <= 120


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_the_pod_floor_on_the_test_cluster(k8s_node, k8s_namespace) -> None:
    from pool.ephemeral.k8s_launcher import KubernetesLauncher
    from pool.ephemeral.podspec import RUNNER_SELECTOR
    from tests.support.waiting import wait_for

    launcher = KubernetesLauncher(namespace=k8s_namespace, image=k8s_node.worker_image, image_pull_policy="Never",
                                  k8s_config=k8s_node.control_plane.kubeconfig)
    samples = ephemeral_floor.pod_floor(launcher, 2)
    assert len(samples) == 2 and all(s > 0 for s in samples)
    core = k8s_node.control_plane.core()
    wait_for(lambda: not core.list_namespaced_pod(k8s_namespace, label_selector=RUNNER_SELECTOR).items, 30,
             "every floor Pod to be deleted", interval=0.5)


class StuckAttach:
    """An attach stream whose worker does not read its stdin yet: a large send waits."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.sent: list[int] = []

    def write_stdin(self, text: str) -> None:
        if len(text) > 64 * 1024:
            self.release.wait(30)
        self.sent.append(len(text))


@pytest.mark.timeout(30)
def test_a_large_task_to_a_pod_still_ends_at_the_deadline() -> None:
    import time

    from pool.ephemeral.k8s_launcher import PodChannel

    ws = StuckAttach()
    channel = PodChannel(None, None, "runner", ws, deadline=time.monotonic() + 0.3)  # type: ignore[arg-type]
    channel.write(b"small line\n")  # sent directly
    with pytest.raises(TimeoutError):
        channel.write(b"x" * (1 << 20))
    ws.release.set()  # what closing the stream does to the helper's send
    assert ws.sent[0] == len("small line\n")
