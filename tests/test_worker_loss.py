"""A call never hangs: lost workers and brokers turn into errors within seconds
(docs/design.md#scaling-and-losing-peers)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, PoolUnavailable, RunnableK8s, WorkerLost
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def pid_then_sleep(seconds):
    """Runs on the worker: tells the test which process it is on (via a file), then sleeps."""
    path, duration = seconds
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(duration)
    return os.getpid()


def start_call(runnable, arg):
    outcome: dict = {}

    def run():
        started = time.monotonic()
        try:
            outcome["value"] = runnable.invoke(arg)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_pid(path, timeout=10.0) -> int:
    """The PID the task wrote once it started on a worker."""
    return int(wait_for(lambda: os.path.exists(path) and Path(path).read_text(), timeout,
                        "the task to start (and write its worker's PID)"))


def test_worker_killed_mid_task_gives_worker_lost_and_the_pool_keeps_serving(tmp_path):
    with LocalPool(workers=2) as pool:
        runnable = RunnableK8s(bound=RunnableLambda(pid_then_sleep), pool=pool.address)
        thread, outcome = start_call(runnable, (str(tmp_path / "pid"), 30))
        victim = wait_for_pid(str(tmp_path / "pid"))
        os.kill(victim, signal.SIGKILL)
        thread.join(15)
        assert isinstance(outcome.get("error"), WorkerLost), outcome
        assert outcome["elapsed"] < 15
        # The surviving worker still serves.
        survivor = runnable.invoke((str(tmp_path / "pid2"), 0))
        assert survivor != victim and survivor in pool.pids


def test_retries_rerun_a_task_whose_worker_died(tmp_path):
    with LocalPool(workers=2) as pool:
        marker = str(tmp_path / "pid")
        runnable = RunnableK8s(bound=RunnableLambda(pid_then_sleep), pool=pool.address, retries=1)
        thread, outcome = start_call(runnable, (marker, 2))
        victim = wait_for_pid(marker)
        os.remove(marker)
        os.kill(victim, signal.SIGKILL)
        thread.join(30)
        assert "error" not in outcome, outcome
        assert outcome["value"] != victim


def test_frozen_worker_is_caught_by_heartbeats(tmp_path):
    with LocalPool(workers=1) as pool:
        runnable = RunnableK8s(bound=RunnableLambda(pid_then_sleep), pool=pool.address)
        thread, outcome = start_call(runnable, (str(tmp_path / "pid"), 30))
        victim = wait_for_pid(str(tmp_path / "pid"))
        os.kill(victim, signal.SIGSTOP)  # alive but silent: only application heartbeats notice
        try:
            thread.join(15)
            assert isinstance(outcome.get("error"), WorkerLost), outcome
            assert "stopped heartbeating" in str(outcome["error"])
        finally:
            os.kill(victim, signal.SIGCONT)


def test_broker_killed_mid_call_gives_pool_unavailable(tmp_path):
    with LocalPool(workers=1) as pool:
        runnable = RunnableK8s(bound=RunnableLambda(pid_then_sleep), pool=pool.address)
        thread, outcome = start_call(runnable, (str(tmp_path / "pid"), 30))
        wait_for_pid(str(tmp_path / "pid"))
        os.kill(pool.pids[0], signal.SIGKILL)  # the broker
        thread.join(15)
        assert isinstance(outcome.get("error"), PoolUnavailable), outcome
