"""``runnable-k8s bench --soak``: a tiny real soak against a LocalPool, checked for shape.

No timed assertions and no verdict asserted (a few hundred calls are all warm-up noise): what is
checked is that the mix ran with only the errors it asked for, and that RSS and fd samples were
taken for the client, the broker and every worker, with growth figures; and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.processes import child_pids
from tests.support.waiting import wait_for


@pytest.mark.timeout(180)
def test_tiny_soak_samples_every_process(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "pool", "bench", "--soak", "0", "--soak-calls", "500",
                           "--soak-interval", "0.2", "--soak-in-flight", "8", "--pool-workers", "2",
                           "--json", str(path)], cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runnable-k8s bench --soak" in proc.stdout and "goal: RSS growth" in proc.stdout
    results = json.loads(path.read_text())
    run = results["run"]
    assert run["calls"] >= 500 and run["unexpected_errors"] == 0, run["unexpected"]
    assert run["expected_errors"] > 0
    assert all(run["by_step"][step] > 0 for step in ("ainvoke", "invoke", "astream", "stream", "abatch", "batch",
                                                     "ainvoke_error", "invoke_error", "ainvoke_10kb"))
    names = {"client", "broker", "worker-1", "worker-2"}
    assert len(results["samples"]) >= 3
    for sample in results["samples"]:
        assert set(sample["processes"]) == names
        for figures in sample["processes"].values():
            assert figures["rss_kb"] > 0 and figures["fds"] > 0
    assert results["baseline"]["calls"] >= 50  # the first 10% of the calls are the warm-up
    assert set(results["growth"]) == names
    for name, g in results["growth"].items():
        assert g["rss_kb_baseline"] > 0 and g["rss_kb_end"] > 0, name
        assert isinstance(g["rss_growth_pct"], float) and isinstance(g["fd_delta"], int), name
        assert isinstance(g["passed"], bool)
    assert results["growth"]["client"]["pid"] != os.getpid()  # the bench's own process, not pytest
    assert isinstance(results["goal"]["met"], bool)
    for pid in (g["pid"] for g in results["growth"].values()):
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10, f"process {pid} to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.timeout(120)
def test_soak_in_process_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pool.cli import main

    before = child_pids()
    assert main(["bench", "--soak", "0", "--soak-calls", "300", "--soak-interval", "0.2", "--soak-in-flight", "4",
                 "--json", str(tmp_path / "s.json")]) == 0
    assert "goal: RSS growth" in capsys.readouterr().out
    results = json.loads((tmp_path / "s.json").read_text())
    assert results["growth"]["client"]["pid"] == os.getpid()
    wait_for(lambda: child_pids() <= before, 10, "the soak's pool to exit")


def test_soak_refuses_a_pool_address(capsys: pytest.CaptureFixture[str]) -> None:
    from pool.cli import main

    assert main(["bench", "--soak", "1", "--pool", "tcp://127.0.0.1:1"]) == 2
    assert "LocalPool" in capsys.readouterr().err
