"""--health-dir: the files the chart's readiness and liveness probes check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pool import LocalPool
from tests.support.ports import dead_address
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def test_ready_while_registered_and_gone_once_draining(tmp_path):
    health = tmp_path / "health"
    with LocalPool(workers=1, worker_args=["--health-dir", str(health)]) as pool:
        wait_for(lambda: (health / "ready").exists(), 15, "the ready file of a registered worker")
        first = (health / "alive").stat().st_mtime
        wait_for(lambda: (health / "alive").stat().st_mtime > first, 15, "the alive file to be touched again")
        pool.scale(0)  # SIGTERM: the worker drains and leaves
        assert not (health / "ready").exists()


def test_alive_but_not_ready_without_a_broker(tmp_path):
    health = tmp_path / "health"
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--connect", dead_address(),
                             "--health-dir", str(health), "--log-level", "ERROR"])
    try:
        wait_for(lambda: (health / "alive").exists(), 15, "the alive file of a worker without a broker")
        first = (health / "alive").stat().st_mtime_ns
        # Touched again: the worker's loop has run on for a touch interval without a broker.
        wait_for(lambda: (health / "alive").stat().st_mtime_ns > first, 15, "the alive file to be touched again")
        assert not (health / "ready").exists()
        assert time.time() - (health / "alive").stat().st_mtime < 5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
    assert not os.path.exists(health / "ready")
