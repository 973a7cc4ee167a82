"""LocalPool's process lifecycle (DESIGN §6, §8): it leaves no process behind, scales up and down,
and a worker told to stop finishes its task first. Each test starts its own pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s

REPO = Path(__file__).resolve().parent.parent


def worker_pid(_: Any) -> int:
    return os.getpid()


def slow_worker_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def remote(pool: LocalPool, fn: Any = worker_pid, **kwargs: Any) -> RunnableK8s:
    kwargs.setdefault("timeout", 20)
    return RunnableK8s(bound=RunnableLambda(fn), pool=pool.address, mode="warm", **kwargs)


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if not is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not is_gone(p)]
    return alive


# ---------------------------------------------------------------------------- no process left behind


@pytest.mark.timeout(30)
def test_a_local_pool_leaves_no_process_behind_after_a_normal_exit():
    with LocalPool(workers=2, concurrency=1) as pool:
        pids = pool.pids
        assert len(pids) == 3  # the broker and two workers
        assert remote(pool).invoke(None) in pids
        assert not any(is_gone(p) for p in pids)
    assert [p for p in pids if not is_gone(p)] == []
    assert pool.pids == []


@pytest.mark.timeout(30)
def test_a_local_pool_leaves_no_process_behind_when_its_block_raises():
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with LocalPool(workers=2, concurrency=1) as pool:
            pids = pool.pids
            assert remote(pool).invoke(None) in pids
            raise RuntimeError("boom")
    assert len(pids) == 3
    assert [p for p in pids if not is_gone(p)] == []


@pytest.mark.timeout(30)
def test_workers_and_broker_leave_by_themselves_when_the_process_that_started_them_dies(tmp_path):
    # A parent that starts a pool and dies without closing it (os._exit skips every cleanup).
    script = textwrap.dedent("""
        import json, os, sys
        from pool import LocalPool
        pool = LocalPool(workers=2, concurrency=1).start()
        print(json.dumps(pool.pids), flush=True)
        os._exit(0)
    """)
    parent = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=25,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.returncode == 0, parent.stderr
    orphans = json.loads(parent.stdout.strip().splitlines()[-1])
    assert len(orphans) == 3
    left = wait_until_gone(orphans, timeout=8)
    if left:  # do not leak them into the rest of the run
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes still running after their parent died: {left}"


# ---------------------------------------------------------------------------- scaling


def live_worker_pids(pool: LocalPool) -> set[int]:
    return {w["pid"] for w in pool.status()["workers"] if not w["draining"]}


@pytest.mark.timeout(45)
def test_scaling_to_three_then_back_to_one_keeps_calls_working():
    with LocalPool(workers=1, concurrency=2) as pool:
        first = set(pool.pids[1:])
        pool.scale(3)
        assert pool.workers == 3
        three = set(pool.pids[1:])
        assert live_worker_pids(pool) == three and first <= three
        # Enough parallel calls that more than one worker must take part.
        used = set(remote(pool, slow_worker_pid).batch([0.3] * 6))
        assert used <= three and len(used) >= 2

        pool.scale(1)
        assert pool.workers == 1
        remaining = set(pool.pids[1:])
        assert len(remaining) == 1
        removed = three - remaining
        assert wait_until_gone(sorted(removed), timeout=10) == []
        assert wait_until_gone_from_status(pool, removed)
        assert set(remote(pool).batch([None] * 4)) == remaining


def wait_until_gone_from_status(pool: LocalPool, pids: set[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pids & {w["pid"] for w in pool.status()["workers"]}:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(30)
def test_scaling_rejects_a_negative_worker_count():
    with pytest.raises(ValueError):
        LocalPool(workers=-1)


# ---------------------------------------------------------------------------- draining on SIGTERM


@pytest.mark.timeout(45)
def test_a_worker_sigtermed_mid_task_finishes_it_takes_no_new_task_and_exits_zero():
    with LocalPool(workers=2, concurrency=2) as pool:
        outcome: list[Any] = []

        def caller() -> None:
            try:
                outcome.append(remote(pool, slow_worker_pid).invoke(2.0))
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

        thread = threading.Thread(target=caller)
        thread.start()
        busy: list[int] = []
        deadline = time.monotonic() + 5
        while not busy and time.monotonic() < deadline:
            busy = [w["pid"] for w in pool.status()["workers"] if w["busy"]]
            time.sleep(0.02)
        assert len(busy) == 1, "the task never started on a worker"
        victim = next(p for p in pool._workers if p.pid == busy[0])
        victim.send_signal(signal.SIGTERM)

        # While it drains (it still has a free slot), new calls go to the other worker only.
        def victim_draining() -> bool:
            return any(w["draining"] for w in pool.status()["workers"] if w["pid"] == victim.pid)

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not victim_draining():
            time.sleep(0.02)
        assert victim_draining(), "the broker never marked the SIGTERMed worker as draining"
        others = set(remote(pool).batch([None] * 4))
        assert victim.pid not in others and others <= set(pool.pids)

        thread.join(15)
        assert not thread.is_alive()
        assert outcome == [victim.pid], f"the drained task did not return its result: {outcome}"
        assert victim.wait(10) == 0
