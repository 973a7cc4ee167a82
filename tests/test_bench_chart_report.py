"""``runnable-k8s bench --chart``: the chart's warm figures in the table, the plot and the ratios,
beside the local pool's (read from the repository's cluster figures, no cluster needed), and the
flag's refusals."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest

from pool.bench import report
from pool.bench.arguments import add_arguments
from pool.bench.command import Bench, chart_ratios
from tests.support.paths import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _with_chart() -> dict:
    """docs/bench/cluster.json with chart figures: the client Pod's twice the local pool's p50."""
    results = json.loads((REPO / "docs" / "bench" / "cluster.json").read_text())
    warm = results["modes"]["warm"]
    client_pod = {**copy.deepcopy(warm), "address": "tcp://pool-worker-pool-broker:5555"}
    for figures in client_pod["workloads"].values():
        figures["p50_ms"] *= 2
    results["chart_warm"] = {
        "client_pod": client_pod,
        "k8s_url": {**copy.deepcopy(warm), "address": "k8s://bench/pool"},
        "chart": {"namespace": "bench", "release": "pool", "service": "pool-worker-pool-broker", "port": 5555,
                  "client_secret": "runnable-k8s-curve-client-default", "image": "runnable-k8s-worker:latest"},
    }
    return results


def test_the_table_shows_the_chart_beside_the_local_pool() -> None:
    results = _with_chart()
    table = report.format_table(results)
    assert "warm (chart) = chart release bench/pool" in table, table[:600]
    for workload in results["modes"]["warm"]["workloads"]:
        rows = [line for line in table.splitlines() if line.startswith(workload)]
        labels = [label for label in ("warm (local pool on the host)", "warm (chart, client Pod)",
                                      "warm (chart, k8s://)") if any(label in row for row in rows)]
        assert len(labels) == 3, (workload, rows)
    # without --chart the local pool's row keeps its short label
    del results["chart_warm"]
    assert "warm (local pool on the host)" not in report.format_table(results)


def test_the_plot_labels_each_warm_series(tmp_path: Path) -> None:
    results = _with_chart()
    assert report._series_label("warm", results).startswith("warm (local pool on the host, ")
    assert report._series_label("warm (chart, client Pod)", results) == "warm (chart, client Pod): release bench/pool"
    assert report._series_label("warm (chart, k8s://)", results) == "warm (chart, k8s://): release bench/pool"
    path = tmp_path / "chart.png"
    report.plot(results, str(path))
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_ratios_read_the_chart_against_a_pod_per_call_and_the_local_pool() -> None:
    results = _with_chart()
    ratios = chart_ratios(results)
    assert ratios["chart_client_pod_warm_p50_over_warm_p50"]["echo"] == 2.0, ratios
    assert ratios["chart_k8s_url_warm_p50_over_warm_p50"]["echo"] == 1.0, ratios
    eph, warm = (results["modes"][m]["workloads"]["echo"]["p50_ms"] for m in ("ephemeral", "warm"))
    assert ratios["ephemeral_p50_over_chart_client_pod_warm_p50"]["echo"] == round(eph / (2 * warm), 1), ratios
    assert not chart_ratios({key: value for key, value in results.items() if key != "chart_warm"})


@pytest.mark.parametrize(("argv", "said"), [
    (["--chart", "only-a-namespace"], "NAMESPACE/RELEASE"),
    (["--chart", "bench/pool", "--modes", "ephemeral"], "add warm to --modes"),
])
def test_a_chart_flag_that_cannot_be_measured_is_refused(argv: list[str], said: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match=said):
        Bench(parser.parse_args(argv))


def test_the_chart_is_read_from_namespace_slash_release_or_a_k8s_url() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for text in ("bench/pool", "k8s://bench/pool"):
        assert Bench(parser.parse_args(["--chart", text])).chart == ("bench", "pool")
    assert Bench(parser.parse_args([])).chart is None
