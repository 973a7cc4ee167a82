"""Ctrl-C during a warm call cancels the task on the worker and frees its slot (docs/design.md#the-warm-path).

The call runs in a child process (a KeyboardInterrupt in the test process itself would stop pytest).
The child restores Python's own SIGINT handler first: a process started from a shell that ignores
SIGINT (nohup, a background job, some CI runners) inherits "ignore", and Ctrl-C would do nothing.
The test sends SIGINT only once the task is known to run on the worker (it writes a file first).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.support.paths import REPO
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

PROGRAM = r'''
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever disposition we inherited

from langchain_core.runnables import RunnableLambda
from pool import LocalPool, RunnableK8s

started = sys.argv[1]


def write_then_sleep(seconds):
    open(started, "w").close()  # the task is running on the worker
    time.sleep(seconds)


with LocalPool(workers=1) as pool:
    remote = RunnableK8s(bound=RunnableLambda(write_then_sleep), pool=pool.address, mode="warm", timeout=120)
    try:
        remote.invoke(60)
        print("finished without an interrupt", flush=True)
    except KeyboardInterrupt:
        deadline = time.monotonic() + 10
        while pool.status()["busy"]:
            if time.monotonic() > deadline:
                print("slot still busy", flush=True)
                sys.exit(1)
            time.sleep(0.05)
        print("interrupted; slot freed", flush=True)
        print("next call:", remote.invoke(0), flush=True)
'''


def test_keyboard_interrupt_cancels_the_remote_task_and_frees_its_slot(tmp_path):
    started = tmp_path / "task-started"
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(started)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, 60, "the task to start on the worker")
        assert proc.poll() is None, "the child exited before its task started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted; slot freed" in out and "next call: None" in out, out
    assert proc.returncode == 0
