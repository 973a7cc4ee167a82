"""``runnable-k8s bench``: a tiny real run (warm + ephemeral on the local launcher), checked for shape.

No timed assertions: the figures depend on the machine. What is checked is that every documented
key is there with a positive number, the table is printed, the PNG is a PNG, and no process
(broker, worker, one-shot worker, floor) is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.processes import child_pids
from tests.support.waiting import wait_for

TINY = ["--calls", "20", "--slow-calls", "5", "--ephemeral-calls", "2", "--in-flight", "1,4",
        "--workers", "1,2", "--throughput-seconds", "0.3", "--floor-tasks", "200", "--io-latency-ms", "20",
        "--stream-chunks", "4", "--stream-chunk-ms", "1",
        # Few slots: the scaling run keeps twice the slots of its largest pool in flight, which with
        # the default 256 per worker made this tiny run 1,024 calls wide (a minute of the suite).
        "--slots", "4"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    try:
        # Alone it takes about a minute; beside the rest of the suite on 2 loaded cores, CI once
        # saw more than 240 s. On a timeout, the bench's last progress lines say where it was.
        proc = subprocess.run(
            [sys.executable, "-m", "pool", "bench", "--modes", "warm,ephemeral", "--launcher", "local", *TINY,
             "--json", str(json_path), "--plot", str(png_path)],
            cwd=REPO, capture_output=True, text=True, timeout=420,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"the tiny bench did not finish in {exc.timeout:g} s; its last output:\n"
                    + stderr.replace("\r", "\n")[-3000:], pytrace=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"stdout": proc.stdout, "stderr": proc.stderr, "json": json.loads(json_path.read_text()),
            "png": png_path}


@pytest.mark.timeout(480)
def test_json_has_every_documented_figure(tiny_run: dict) -> None:
    results = tiny_run["json"]
    assert set(results) >= {"modes", "floor", "environment", "in_process", "scaling", "ratios", "goals", "settings"}
    assert not any(key.startswith("_") for key in results)
    for mode in ("warm", "ephemeral"):
        figures = results["modes"][mode]
        for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_per_s", "ttfc_p50_ms", "overhead_ms"):
            assert key in figures, (mode, key)
        for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_per_s", "ttfc_p50_ms"):
            assert _positive(figures[key]), (mode, key, figures[key])
        assert set(figures["throughput_by_concurrency"]) == {"1", "4"}
        for workload in ("echo", "io", "stream"):
            w = figures["workloads"][workload]
            keys = ("p1_ms", "p25_ms", "p50_ms", "p75_ms", "p95_ms", "p99_ms", "mean_ms")
            assert all(_positive(w[k]) for k in keys), \
                (mode, workload, w)
            assert all(_positive(v) for v in w["throughput_by_concurrency"].values()), (mode, workload, w)
            assert workload in figures["overhead"]
        assert all(_positive(figures["workloads"]["stream"]["ttfc"][k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
    for workload in ("echo", "io", "stream"):
        # each process's CPU per call: in-process (the reference), and the warm pool at each in-flight
        assert _positive(results["in_process"]["workloads"][workload]["cpu_us_per_call"]["client"]), workload
        cpu = results["modes"]["warm"]["workloads"][workload]["cpu_us_per_call_by_concurrency"]
        assert set(cpu) == {"1", "4"}, cpu
        for figures in cpu.values():
            assert {"client", "broker", "worker-1", "worker-2", "workers", "total"} <= set(figures), figures
            assert figures["total"] >= figures["client"], figures
    assert results["modes"]["ephemeral"]["launcher"] == "local"
    assert results["modes"]["warm"]["pool"]["local"] is True
    big = results["modes"]["warm"]["big_runnable"]
    assert _positive(big["runnable_1kb"]["p50_ms"]) and _positive(big["runnable_1mb"]["p50_ms"])
    floor = results["floor"]
    assert all(_positive(floor[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "throughput_per_s"))
    assert all(_positive(v) for v in floor["throughput_by_concurrency"].values())
    scaling = results["scaling"]
    assert scaling["workers"] == [1, 2]
    assert all(_positive(scaling["throughput_by_workers"][k]) for k in ("1", "2"))
    assert _positive(results["ratios"]["ephemeral_p50_over_warm_p50"]["echo"])
    assert _positive(results["ratios"]["warm_p50_over_floor_plus_in_process"])
    assert results["goals"]["warm_p50_speedup_over_ephemeral"]["goal"] == 500
    env = results["environment"]
    assert env["cpus"] and env["python"] and env["langchain_core"]


@pytest.mark.timeout(480)
def test_table_png_and_progress(tiny_run: dict) -> None:
    out = tiny_run["stdout"]
    for text in ("p50 ms", "in-process", "bare pyzmq floor", "warm", "ephemeral (a process per call)",
                 "time to first streamed chunk", "scaling: io workload", "goals", "1 MB runnable",
                 "CPU us per call", "warm, 4 in flight"):
        assert text in out, text
    assert "steps" in tiny_run["stderr"]  # the tqdm bar
    png = tiny_run["png"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000


@pytest.mark.timeout(480)
def test_replot_redraws_table_and_png_from_the_json(tiny_run: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pool.cli import main

    path = tmp_path / "again.json"
    path.write_text(json.dumps(tiny_run["json"]))
    assert main(["bench", "--replot", str(path), "--plot", str(tmp_path / "again.png")]) == 0
    assert "p50 ms" in capsys.readouterr().out
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.timeout(300)
def test_in_process_run_leaves_no_process_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The entry point called in this process: pools, floor and one-shot workers are all gone after."""
    from pool.cli import main

    before = child_pids()
    floor_folders = set(Path(tempfile.gettempdir()).glob("rk8s-floor-*"))
    code = main(["bench", "--modes", "warm,ephemeral", "--launcher", "local", "--workload", "echo,stream",
                 *TINY, "--no-progress", "--json", str(tmp_path / "b.json")])
    assert code == 0
    assert "p50 ms" in capsys.readouterr().out
    results = json.loads((tmp_path / "b.json").read_text())
    assert set(results["modes"]["warm"]["workloads"]) == {"echo", "stream"}
    assert "scaling" not in results  # no io workload, no scaling run
    wait_for(lambda: child_pids() <= before, 10, "every process the bench started to exit")
    assert set(Path(tempfile.gettempdir()).glob("rk8s-floor-*")) <= floor_folders  # the floor's socket folder too


@pytest.mark.timeout(120)
def test_warm_against_a_running_pool(local_pool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--pool ADDRESS`: the bench uses that pool (and runs no scaling run: its workers are not ours)."""
    from pool.cli import main

    code = main(["bench", "--modes", "warm", "--pool", local_pool.address, "--workload", "echo,io", *TINY,
                 "--no-progress", "--no-big-runnable", "--json", str(tmp_path / "w.json")])
    assert code == 0
    assert local_pool.address in capsys.readouterr().out
    results = json.loads((tmp_path / "w.json").read_text())
    assert results["modes"]["warm"]["pool"] == {"address": local_pool.address, "local": False}
    assert set(results["modes"]) == {"warm"} and "scaling" not in results
    assert _positive(results["modes"]["warm"]["workloads"]["io"]["throughput_per_s"])


@pytest.mark.timeout(120)
def test_bad_mode_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "pool", "bench", "--modes", "lukewarm"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "lukewarm" in proc.stderr


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_real_pod_per_call_on_the_test_cluster(k8s_node, k8s_namespace, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`--launcher kubernetes`: real runner Pods, two of them in flight at once, all deleted after."""
    from pool.cli import main
    from pool.ephemeral.podspec import RUNNER_SELECTOR

    code = main(["bench", "--modes", "ephemeral", "--launcher", "kubernetes",
                 "--kubeconfig", k8s_node.control_plane.kubeconfig, "--namespace", k8s_namespace,
                 "--image", k8s_node.worker_image, "--image-pull-policy", "Never", "--workload", "echo,stream",
                 "--calls", "20", "--slow-calls", "5", "--ephemeral-calls", "2", "--in-flight", "1,2",
                 "--workers", "0", "--no-progress",
                 "--json", str(tmp_path / "k.json"), "--plot", str(tmp_path / "k.png")])
    assert code == 0
    assert "a Pod per call" in capsys.readouterr().out
    results = json.loads((tmp_path / "k.json").read_text())
    eph = results["modes"]["ephemeral"]
    assert eph["launcher"] == "kubernetes"
    assert _positive(eph["p50_ms"]) and _positive(eph["ttfc_p50_ms"])
    assert all(_positive(v) for v in eph["throughput_by_concurrency"].values())
    assert _positive(eph["workloads"]["echo"]["pod_start_and_attach"]["p50_ms"])
    assert results["environment"]["kubernetes"]["nodes"] >= 1
    assert (tmp_path / "k.png").read_bytes()[:8] == PNG_SIGNATURE
    core = k8s_node.control_plane.core()
    wait_for(lambda: not core.list_namespaced_pod(k8s_namespace, label_selector=RUNNER_SELECTOR).items, 30,
             "every runner Pod to be deleted", interval=0.5)


def test_labels_say_where_the_warm_pool_and_the_ephemeral_calls_ran() -> None:
    """A run with --launcher kubernetes measures a LocalPool on this host against Pods on the
    cluster: its table and plot say so, rather than "warm (2 workers)" beside "a Pod per call"."""
    from pool.bench import report

    results = json.loads((REPO / "docs" / "bench" / "cluster.json").read_text())
    pool = results["modes"]["warm"]["pool"]
    assert pool["local"] and results["modes"]["ephemeral"]["launcher"] == "kubernetes"
    where = f"LocalPool on this host ({pool['workers']} workers x {pool['slots']} slots)"
    assert report._series_label("ephemeral", results) == "ephemeral: a Pod per call on the cluster"
    assert f"warm = {where}" in report.format_table(results).splitlines()[0]
    if results.get("chart_warm"):  # measured beside the chart's workers: the label says which warm is which
        size = f"{pool['workers']} workers x {pool['slots']} slots"
        assert report._series_label("warm", results) == f"warm (local pool on the host, {size})"
        results = {key: value for key, value in results.items() if key != "chart_warm"}
    assert report._series_label("warm", results) == f"warm: {where}"
    results["modes"]["warm"]["pool"] = {**pool, "workers": 1, "slots": 1}
    assert report._series_label("warm", results) == "warm: LocalPool on this host (1 worker x 1 slot)"


def test_a_scaling_run_with_more_workers_than_cpus_says_why_it_is_flat() -> None:
    """A flat scaling panel on a small host reads as a broken pool unless the report says that the
    workers share the host's CPUs; a run that fits the CPUs says nothing of the kind."""
    from pool.bench.report import scaling_caveat

    scaling = {"workers": [1, 2, 4]}
    assert "share this host's 2 CPUs" in (scaling_caveat(scaling, 2) or "")
    assert scaling_caveat(scaling, 8) is None
    assert scaling_caveat(scaling, None) is None
