"""What `runnable-k8s status` shows of the workers: the broker's own names and key fingerprints,
never a ZeroMQ routing id (an address a peer could take over if it were shown)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pool import LocalPool


@pytest.mark.timeout(90)
def test_status_names_workers_by_serial_and_key_fingerprint_and_shows_their_input_budget() -> None:
    with LocalPool(workers=2, port=0) as pool:  # tcp with keys: workers have keys to fingerprint
        pool.wait_for_workers(2, timeout=30)
        out = subprocess.run(
            [sys.executable, "-m", "pool", "status", "--pool", pool.address, "--keys", str(pool.keys_dir)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    header = next(i for i, line in enumerate(out.splitlines()) if line.startswith("worker "))
    rows = [line.split() for line in out.splitlines()[header + 1:] if line.strip()]
    assert len(rows) == 2, out
    for name, key, *_rest in rows:
        assert re.fullmatch(r"w\d+", name), out
        assert re.fullmatch(r"[0-9a-f]{8}", key), out
    assert rows[0][1] == rows[1][1], "both workers registered with the pool's one worker key"
    # Input MiB in flight / budget: nothing in flight, a budget of at least 1 MiB.
    held, budget = (int(x) for x in rows[0][-2].split("/"))
    assert held == 0 and budget >= 1, out
