"""pool.bench.chart_warm without a cluster: the client Pod it would create (the chart's client keys
mounted only when the chart uses keys, the same bench arguments as the host's run) and the
refusal of a bench result without warm figures. The run itself is tests/test_bench_chart_cluster.py."""

from __future__ import annotations

import pytest

from pool.bench.chart_warm import POD_KEYS_DIR, _bench_args, _warm_figures, client_pod_manifest
from pool.errors import RunnableK8sError

ARGS = _bench_args(["echo", "io"], 20, 5, [1, 8], 0.5, ["--payload-bytes", "100"])


def test_the_bench_both_clients_run_is_warm_only_with_the_given_figures() -> None:
    assert ARGS[:2] == ["--modes", "warm"] and "--no-big-runnable" in ARGS
    for flag, value in (("--workload", "echo,io"), ("--calls", "20"), ("--slow-calls", "5"),
                        ("--in-flight", "1,8"), ("--workers", "0"), ("--payload-bytes", "100")):
        assert ARGS[ARGS.index(flag) + 1] == value, (flag, ARGS)


def test_the_client_pod_mounts_the_client_keys_when_the_chart_has_keys() -> None:
    labels = {"pool-worker-pool-client": "true"}
    pod = client_pod_manifest("b", "img:1", "Never", "tcp://svc:5555", "prefix-client-default", labels, ARGS)
    container = pod["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--pool") + 1] == "tcp://svc:5555"
    assert command[command.index("--keys") + 1] == POD_KEYS_DIR
    assert command[-len(ARGS):] == ARGS
    assert container["volumeMounts"][0]["mountPath"] == POD_KEYS_DIR
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "prefix-client-default"
    assert pod["metadata"]["labels"] == labels and pod["spec"]["automountServiceAccountToken"] is False
    assert container["imagePullPolicy"] == "Never"


def test_without_keys_the_client_pod_has_no_key_volume_and_no_keys_flag() -> None:
    pod = client_pod_manifest("b", "img:1", None, "tcp://svc:5555", None, {}, ARGS)
    container = pod["spec"]["containers"][0]
    assert "--keys" not in container["command"] and "volumes" not in pod["spec"]
    assert "volumeMounts" not in container and "imagePullPolicy" not in container


def test_a_bench_result_without_warm_figures_is_refused_naming_the_address() -> None:
    with pytest.raises(RunnableK8sError, match="k8s://ns/rel"):
        _warm_figures({"modes": {}}, "k8s://ns/rel")
    figures = _warm_figures({"modes": {"warm": {"workloads": {}}}, "in_process": {"workloads": {"echo": {}}}},
                            "tcp://svc:5555")
    assert figures["address"] == "tcp://svc:5555" and figures["in_process"] == {"echo": {}}
