"""Ctrl-C during a warm call cancels the task on the worker and frees its slot (DESIGN §4).

The call runs in a child process (a KeyboardInterrupt in the test process itself would stop pytest).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(90)

PROGRAM = r'''
import sys, time
from langchain_core.runnables import RunnableLambda
from pool import LocalPool, RunnableK8s

with LocalPool(workers=1) as pool:
    remote = RunnableK8s(bound=RunnableLambda(lambda seconds: time.sleep(seconds)), pool=pool.address)
    print("calling", flush=True)
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


def test_keyboard_interrupt_cancels_the_remote_task_and_frees_its_slot():
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "calling"
        time.sleep(2)  # the task is running on the worker by now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted; slot freed" in out and "next call: None" in out, out
    assert proc.returncode == 0
