"""--health-dir: the files the chart's readiness and liveness probes check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pool import LocalPool

pytestmark = pytest.mark.timeout(60)


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_ready_while_registered_and_gone_once_draining(tmp_path):
    health = tmp_path / "health"
    with LocalPool(workers=1, worker_args=["--health-dir", str(health)]) as pool:
        wait_for(lambda: (health / "ready").exists())
        first = (health / "alive").stat().st_mtime
        wait_for(lambda: (health / "alive").stat().st_mtime > first)  # touched again: the loop runs
        pool.scale(0)  # SIGTERM: the worker drains and leaves
        assert not (health / "ready").exists()


def test_alive_but_not_ready_without_a_broker(tmp_path):
    health = tmp_path / "health"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--connect", f"tcp://127.0.0.1:{port}",
                             "--health-dir", str(health), "--log-level", "ERROR"])
    try:
        wait_for(lambda: (health / "alive").exists())
        time.sleep(1.5)
        assert not (health / "ready").exists()
        assert time.time() - (health / "alive").stat().st_mtime < 5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
    assert not os.path.exists(health / "ready")
