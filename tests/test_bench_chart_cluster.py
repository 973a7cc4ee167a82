"""The bench's warm figures through an installed worker-pool chart (pool.bench.chart_warm) on the
real test cluster (tests/cluster): a client Pod calling the broker's Service and this host calling
k8s://NAMESPACE/RELEASE both answer, with the bench's warm shape, and nothing is left behind."""

from __future__ import annotations

import time

import pytest

from pool.bench.chart_warm import measure_chart_warm
from pool.keys import create_key_directory
from tests.support.chart_release import (
    KEY_PREFIX,
    RELEASE,
    assert_nothing_left,
    create_key_secrets,
    describe,
    ready_pods,
    require_health_dir,
)
from tests.support.helm import CHART, helm, values_file

pytestmark = pytest.mark.cluster
IN_FLIGHT = [1, 4]


def _assert_warm_shape(figures: dict, address: str) -> None:
    assert figures["address"] == address, figures
    for workload in ("echo", "io"):
        w = figures["workloads"][workload]
        assert 0 < w["p50_ms"] <= w["p95_ms"] <= w["p99_ms"], (workload, w)
        assert w["calls"] == (20 if workload == "echo" else 5), (workload, w)
        assert set(w["throughput_by_concurrency"]) == {str(n) for n in IN_FLIGHT}, (workload, w)
        assert all(rate > 0 for rate in w["throughput_by_concurrency"].values()), (workload, w)
    # io sleeps 50 ms per call: a figure below that did not run the workload on a worker
    assert figures["workloads"]["io"]["p50_ms"] >= 50, figures["workloads"]["io"]
    assert figures["pool"] == {"address": figures["pool"]["address"], "local": False}, figures["pool"]


@pytest.mark.timeout(600)
def test_warm_figures_come_from_a_client_pod_and_from_k8s_url(helm_bin, k8s_node, k8s_namespace, tmp_path):
    cp = k8s_node.control_plane
    core, ns, kubeconfig = cp.core(), k8s_namespace, cp.kubeconfig
    create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(tmp_path / "keys"))
    require_health_dir(core, ns)
    values = {"image": {"tag": "latest", "pullPolicy": "Never"}}
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, values),
                   "--wait", "--timeout", "180s", tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=210)
    heard: list[str] = []
    try:
        assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
        assert len(ready_pods(core, ns, "worker")) == 2, describe(core, ns)
        pods_before = {p.metadata.name for p in core.list_namespaced_pod(ns).items}
        started = time.monotonic()
        result = measure_chart_warm(ns, RELEASE, image=k8s_node.worker_image, calls=20, in_flight=IN_FLIGHT,
                                    kubeconfig=kubeconfig, progress=heard.append, slow_calls=5,
                                    throughput_seconds=0.5, image_pull_policy="Never", timeout=300)
        print(f"measured in {time.monotonic() - started:.0f} s:",
              {where: {w: result[where]["workloads"][w]["p50_ms"] for w in ("echo", "io")}
               for where in ("client_pod", "k8s_url")})
        # the chart uses keys: the client Pod mounted its client Secret, the host used its files
        assert result["chart"]["client_secret"] == f"{KEY_PREFIX}-client-default", result["chart"]
        assert result["chart"]["service"] == f"{RELEASE}-worker-pool-broker", result["chart"]
        _assert_warm_shape(result["client_pod"], f"tcp://{RELEASE}-worker-pool-broker:5555")
        _assert_warm_shape(result["k8s_url"], f"k8s://{ns}/{RELEASE}")
        assert len(heard) == 2 and "client Pod" in heard[0] and "k8s://" in heard[1], heard
        # the client Pod is gone (deleted by measure_chart_warm, not by the namespace's deletion)
        left = {p.metadata.name for p in core.list_namespaced_pod(ns).items
                if p.metadata.deletion_timestamp is None} - pods_before
        assert not left, left
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s",
                         tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)
