"""The chart's monitoring extras (metrics.dashboard, metrics.prometheusRule): off by default, the
schema refuses bad values, and rendered they are what Grafana's sidecar and the Prometheus
Operator load. Their queries are proven against a real Prometheus in test_prometheus_queries.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.helm import CHART, helm, values_file
from tests.support.prometheus import helm_binary

ON: dict[str, Any] = {"metrics": {
    "enabled": True,
    "dashboard": {"enabled": True, "label": "grafana_dashboard", "labelValue": "yes", "namespace": "monitoring",
                  "annotations": {"grafana_folder": "LLM"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "additionalAlertLabels": {"team": "llm"},
                       "queueWaiting": {"quantile": 0.95, "seconds": 5, "window": "10m", "for": "15m"},
                       "brokerMemory": {"ratio": 0.9}},
}}


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merged(over: dict[str, Any]) -> dict[str, Any]:
    out = values()
    for key, section in over["metrics"].items():
        current = out["metrics"].get(key)
        out["metrics"][key] = {**current, **section} if isinstance(current, dict) else section
    return out


@pytest.mark.timeout(30)
def test_both_are_off_by_default_and_the_values_fit_the_schema() -> None:
    defaults = values()["metrics"]
    assert defaults["dashboard"]["enabled"] is False
    assert defaults["prometheusRule"]["enabled"] is False
    assert defaults["dashboard"]["label"] == "grafana_dashboard" and defaults["dashboard"]["labelValue"] == "1"
    jsonschema.validate(merged(ON), schema())


BAD = {
    "memory ratio above 1": {"metrics": {"prometheusRule": {"brokerMemory": {"ratio": 1.5}}}},
    "duration without a unit": {"metrics": {"prometheusRule": {"noReadyWorkers": {"for": "5"}}}},
    "queue wait quantile 1": {"metrics": {"prometheusRule": {"queueWaiting": {"quantile": 1}}}},
    "queue wait of 0 seconds": {"metrics": {"prometheusRule": {"queueWaiting": {"seconds": 0}}}},
    "the old queue depth": {"metrics": {"prometheusRule": {"queueWaiting": {"depth": 5}}}},
    "memory from an unknown source": {"metrics": {"prometheusRule": {"brokerMemory": {"source": "node"}}}},
    "unknown alert": {"metrics": {"prometheusRule": {"queueWait": {"for": "5m"}}}},
    "runbook not a URL": {"metrics": {"prometheusRule": {"runbookBaseUrl": "README.md"}}},
    "dashboard label empty": {"metrics": {"dashboard": {"label": ""}}},
    "dashboard label value not a string": {"metrics": {"dashboard": {"labelValue": 1}}},
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD))
def test_the_schema_refuses_bad_monitoring_values(case: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merged(BAD[case]), schema())


@pytest.mark.cluster  # needs the helm CLI the cluster tier builds (tests/cluster/build.sh binaries)
@pytest.mark.timeout(120)
def test_rendered_dashboard_and_rule_are_what_grafana_and_the_operator_load(tmp_path: Path) -> None:
    helm_bin = helm_binary()
    if helm_bin is None:
        pytest.skip("the helm CLI is not built; run: bash tests/cluster/build.sh binaries")

    def render(over: dict[str, Any] | None) -> list[dict[str, Any]]:
        args = ["template", "rel", str(CHART), "-n", "team-a"]
        if over is not None:
            args += ["-f", values_file(tmp_path, over)]
        result = helm(helm_bin, *args, tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]

    assert not [d for d in render(None) if d["kind"] in ("ConfigMap", "PrometheusRule")]
    docs = render(ON)
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    for kube in ("1.30", "1.35"):
        kubernetes_validate.validate(config_map, kube, strict=True)
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "yes"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    dashboard = json.loads(config_map["data"]["runnable-k8s.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "runnable-k8s.json").read_text())
    # A data source variable, and no panel or target names a data source by uid.
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    for panel in dashboard["panels"]:
        for item in (panel, *panel.get("targets", ())):
            assert item.get("datasource", {}).get("uid", "${datasource}") == "${datasource}", panel["title"]

    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    waiting = alerts["RunnableK8sQueueWaiting"]["expr"]
    assert waiting.startswith("histogram_quantile(0.95, ") and "runnable_k8s_queue_wait_seconds_bucket{" in waiting
    assert waiting.endswith("[10m]))) > 5")
    assert alerts["RunnableK8sQueueWaiting"]["for"] == "15m"
    memory = alerts["RunnableK8sBrokerMemoryHigh"]["expr"]
    assert memory.endswith("> 0.9")
    # The broker's own series by default: no kube-state-metrics or cAdvisor needed.
    assert "process_resident_memory_bytes{" in memory and "runnable_k8s_memory_limit_bytes{" in memory
    assert "container_memory_working_set_bytes" not in memory
    cadvisor = {"metrics": {**ON["metrics"], "prometheusRule": {
        **ON["metrics"]["prometheusRule"], "brokerMemory": {"ratio": 0.9, "source": "cadvisor"}}}}
    [rule_cadvisor] = [d for d in render(cadvisor) if d["kind"] == "PrometheusRule"]
    memory = {r["alert"]: r for r in rule_cadvisor["spec"]["groups"][0]["rules"]}["RunnableK8sBrokerMemoryHigh"]["expr"]
    assert memory.startswith("max by (namespace, pod) (container_memory_working_set_bytes{")
    assert memory.endswith("> 0.9")
    assert "kube_pod_container_resource_limits{" in memory
    for name, alert in alerts.items():
        assert alert["labels"]["team"] == "llm", name
        assert alert["annotations"]["runbook_url"].endswith(f"README.md#runbook-{name.lower()}")
        assert 'namespace="team-a"' in alert["expr"], name
