"""The chart's autoscaling modes (`autoscaling.mode: builtin | keda | hpa`), rendered by the real
helm CLI: each mode's manifests against the Kubernetes 1.30-1.35 schemas, the KEDA ScaledObject
against KEDA's own CRD schema (from its Go module, fetched once with the Go toolchain and kept in
the test cluster's cache), and the combinations the chart refuses, with their messages.

The helm tests are marked ``cluster``, like tests/test_chart.py's: the cluster tier builds the helm
CLI (`bash tests/cluster/build.sh binaries`), and they skip where it is not built;
the KEDA CRD test skips when no `go` is on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.helm import CHART, helm, values_file
from tests.support.keda import KEDA_VERSION, go_binary, keda_module_dir
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import stop_process
from tests.support.waiting import wait_for

SUPPORTED_KUBERNETES = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
NOT_IN_KUBERNETES_SCHEMAS = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}

KEDA: dict[str, Any] = {"autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 0, "maxReplicas": 12,
                                        "targetTasksPerSlot": 0.8, "stabilizationWindowSeconds": 120,
                                        "scaleToZeroIdleSeconds": 900},
                        "metrics": {"enabled": True}}
KEDA_PROMETHEUS: dict[str, Any] = {
    "autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 0,
                    "keda": {"trigger": "prometheus",
                             "prometheus": {"serverAddress": "http://prometheus-operated.monitoring.svc:9090"},
                             "authenticationRef": {"name": "prom-auth"},
                             "fallback": {"failureThreshold": 3, "replicas": 2}}},
    "metrics": {"enabled": True}}
HPA: dict[str, Any] = {"autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 2, "maxReplicas": 30,
                                       "targetTasksPerSlot": 0.8, "stabilizationWindowSeconds": 240},
                       "metrics": {"enabled": True}}
BUILTIN: dict[str, Any] = {"autoscaling": {"enabled": True}}
MODES = {"builtin": BUILTIN, "keda": KEDA, "keda-prometheus": KEDA_PROMETHEUS, "hpa": HPA,
         "hpa-object": {**HPA, "autoscaling": {**HPA["autoscaling"], "hpa": {"metric": {"type": "Object"}}}},
         "hpa-pods": {**HPA, "autoscaling": {**HPA["autoscaling"], "hpa": {"metric": {"type": "Pods",
                                                                                    "selector": {}}}}}}


# ------------------------------------------------------------------ helpers
def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def chart_values(over: dict) -> dict:
    return deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), over)


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def render(helm_bin: str, tmp_path: Path, values: dict, *, kube: str = "1.33") -> list[dict]:
    result = helm(helm_bin, "template", "rel", str(CHART), "-n", "team-a", "--kube-version", f"{kube}.0",
                  "-f", values_file(tmp_path, values), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def refusal(helm_bin: str, tmp_path: Path, values: dict) -> str:
    result = helm(helm_bin, "template", "rel", str(CHART), "-n", "team-a", "-f", values_file(tmp_path, values),
                  tmp_path=tmp_path)
    assert result.returncode != 0, "helm rendered values it should refuse"
    return result.stderr


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in kinds(docs, kind)
             if component is None or d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def broker_command(docs: list[dict]) -> list[str]:
    return one(docs, "Deployment", "broker")["spec"]["template"]["spec"]["containers"][0]["command"]


# ------------------------------------------------------------------ KEDA's CRD schema
def _strict_crd_schema(node: Any) -> Any:
    """The CRD's openAPIV3Schema as a jsonschema validator reads it, and as strict as the API
    server's strict field validation: `x-kubernetes-*` extensions replaced by what they mean
    (int-or-string) or dropped (list types, CEL rules: the one rule is checked by hand), and an
    object with known properties refuses unknown ones (a misspelt field must fail the test)."""
    if isinstance(node, list):
        return [_strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_crd_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def keda_crd() -> dict:
    """KEDA's ScaledObject CRD from its Go module, downloaded once into the cluster cache."""
    if go_binary() is None:
        pytest.skip("no Go toolchain: KEDA's CRD schema comes from its Go module (go mod download)")
    crd = yaml.safe_load((keda_module_dir() / "config/crd/bases/keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    return crd


def validate_scaled_object(crd: dict, doc: dict) -> None:
    version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
    assert version["served"], f"KEDA {KEDA_VERSION} no longer serves {doc['apiVersion']}"
    raw = version["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, _strict_crd_schema(raw))
    # The spec's one CEL rule, by hand.
    rules = [r["rule"] for r in raw["properties"]["spec"].get("x-kubernetes-validations", [])]
    assert rules == ["!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount)"
                     " ? self.maxReplicaCount : 100)"], f"KEDA's CEL rules changed: {rules}"
    spec = doc["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


# ------------------------------------------------------------------ values.schema.json (no helm)
@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_values_schema_accepts_each_mode(mode):
    jsonschema.validate(chart_values(MODES[mode]), schema())


BAD_VALUES = {
    "an unknown mode": {"autoscaling": {"mode": "vpa"}},
    "an unknown KEDA trigger": {"autoscaling": {"keda": {"trigger": "cpu"}}},
    "a polling interval of zero": {"autoscaling": {"keda": {"pollingInterval": 0}}},
    "a metrics-api url that is not http": {"autoscaling": {"keda": {"metricsApi": {"url": "tcp://broker:9090"}}}},
    "an unknown KEDA value": {"autoscaling": {"keda": {"threshold": 5}}},
    "an HPA metric type the chart does not render": {"autoscaling": {"hpa": {"metric": {"type": "Resource"}}}},
    "an empty HPA metric name": {"autoscaling": {"hpa": {"metric": {"name": ""}}}},
    "a behavior key the HPA does not have": {"autoscaling": {"behavior": {"scaleSideways": {}}}},
    "an authenticationRef of another kind": {"autoscaling": {"keda": {"authenticationRef": {"name": "a",
                                                                                            "kind": "Secret"}}}},
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_the_values_schema_refuses_bad_autoscaling_values(case):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chart_values(BAD_VALUES[case]), schema())


# ------------------------------------------------------------------ rendered, with helm
@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_renders_manifests_the_kubernetes_schemas_accept(helm_bin, tmp_path, mode):
    for kube in SUPPORTED_KUBERNETES:
        docs = render(helm_bin, tmp_path, MODES[mode], kube=kube)
        for doc in docs:
            if doc["apiVersion"] not in NOT_IN_KUBERNETES_SCHEMAS:
                kubernetes_validate.validate(doc, kube, strict=True)


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_helm_lint_strict_is_clean_in_each_mode(helm_bin, tmp_path, mode):
    result = helm(helm_bin, "lint", "--strict", str(CHART), "-f", values_file(tmp_path, MODES[mode]), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["keda", "keda-prometheus"])
def test_the_scaled_object_fits_kedas_own_crd_schema(helm_bin, tmp_path, keda_crd, mode):
    validate_scaled_object(keda_crd, one(render(helm_bin, tmp_path, MODES[mode]), "ScaledObject"))


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(300)
def test_the_crd_validation_refuses_what_keda_would(helm_bin, tmp_path, keda_crd):
    """The validator is not vacuous: a misspelt field, a wrong type, a missing trigger, and
    min above max (KEDA's CEL rule) are all refused."""
    good = one(render(helm_bin, tmp_path, KEDA), "ScaledObject")
    validate_scaled_object(keda_crd, good)
    broken = [
        deep_merge(good, {"spec": {"minReplicas": 0}}),
        deep_merge(good, {"spec": {"pollingInterval": "often"}}),
        deep_merge(good, {"spec": {"triggers": []}}),
        deep_merge(good, {"spec": {"minReplicaCount": 20, "maxReplicaCount": 10}}),
    ]
    for doc in broken:
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            validate_scaled_object(keda_crd, doc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("values", [BUILTIN, {"autoscaling": {"enabled": True, "mode": "builtin"}}],
                         ids=["enabled-alone", "enabled-and-builtin"])
@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
def test_builtin_is_the_broker_patching_the_deployment_with_its_role(helm_bin, tmp_path, values):
    docs = render(helm_bin, tmp_path, values)
    command = broker_command(docs)
    assert "--autoscale-deployment=rel-worker-pool-worker" in command
    assert one(docs, "Deployment", "broker")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert one(docs, "Role")["rules"][0]["resources"] == ["deployments/scale"]
    assert one(docs, "RoleBinding")["roleRef"]["name"] == "rel-worker-pool-broker-autoscaler"
    assert not kinds(docs, "ScaledObject") and not kinds(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in one(docs, "Deployment", "worker")["spec"]


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_autoscaling_off_renders_no_controller_and_fixed_replicas(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, {})
    assert not any(a.startswith("--autoscale") for a in broker_command(docs))
    assert not kinds(docs, "Role") and not kinds(docs, "ScaledObject") and not kinds(docs, "HorizontalPodAutoscaler")
    assert one(docs, "Deployment", "worker")["spec"]["replicas"] == 2


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["keda", "hpa"])
def test_keda_and_hpa_leave_the_broker_computing_the_signal_without_patching(helm_bin, tmp_path, mode):
    docs = render(helm_bin, tmp_path, MODES[mode])
    command = broker_command(docs)
    scaling_flags = [a for a in command if a.startswith("--autoscale")]
    minimum, maximum = MODES[mode]["autoscaling"]["minReplicas"], MODES[mode]["autoscaling"]["maxReplicas"]
    assert scaling_flags == [f"--autoscale-min={minimum}", f"--autoscale-max={maximum}", "--autoscale-in-flight=64",
                             "--autoscale-target=0.8"]
    assert "--metrics-port=9090" in command
    assert one(docs, "Deployment", "broker")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not kinds(docs, "Role") and not kinds(docs, "RoleBinding")
    assert "replicas" not in one(docs, "Deployment", "worker")["spec"]


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_keda_scales_to_zero_on_the_brokers_scaling_endpoint(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, KEDA)
    spec = one(docs, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-worker-pool-worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 12, 900)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"] == {"stabilizationWindowSeconds": 120}
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 12, "periodSeconds": 15}]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    # min(64 in flight, 256 slots) x 0.8: KEDA asks for ceil(demand / 51.2) workers, as the broker would.
    assert trigger["metadata"] == {"url": "http://rel-worker-pool-broker.team-a.svc:9090/scaling", "format": "json",
                                   "valueLocation": "demand", "targetValue": "51.2", "activationTargetValue": "0"}
    # The KEDA operator may poll the metrics port; nobody else is added.
    policy = next(d for d in kinds(docs, "NetworkPolicy") if d["metadata"]["name"] == "rel-worker-pool-broker-keda")
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                             "podSelector": {"matchLabels": {"app": "keda-operator"}}}]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "broker"


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_keda_operator_policy_follows_its_values(helm_bin, tmp_path):
    names = lambda docs: sorted(d["metadata"]["name"] for d in kinds(docs, "NetworkPolicy"))  # noqa: E731
    assert "rel-worker-pool-broker-keda" not in names(
        render(helm_bin, tmp_path, deep_merge(KEDA, {"autoscaling": {"keda": {"operatorFrom": []}}})))
    assert "rel-worker-pool-broker-keda" not in names(render(helm_bin, tmp_path, KEDA_PROMETHEUS))
    assert names(render(helm_bin, tmp_path, deep_merge(KEDA, {"networkPolicy": {"enabled": False}}))) == []


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_keda_prometheus_trigger_queries_this_releases_broker(helm_bin, tmp_path):
    spec = one(render(helm_bin, tmp_path, KEDA_PROMETHEUS), "ScaledObject")["spec"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
        "query": 'max(runnable_k8s_scaling_demand{namespace="team-a",pod=~"rel-worker-pool-broker-.*"})',
        "threshold": "64", "activationThreshold": "0"}
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}
    custom = deep_merge(KEDA_PROMETHEUS, {"autoscaling": {"keda": {"prometheus": {"query": "sum(x)"}}}})
    [trigger] = one(render(helm_bin, tmp_path, custom), "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["query"] == "sum(x)"


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_hpa_scales_on_an_external_metric_with_the_same_divisor(helm_bin, tmp_path):
    spec = one(render(helm_bin, tmp_path, HPA), "HorizontalPodAutoscaler")["spec"]
    assert spec["scaleTargetRef"]["name"] == "rel-worker-pool-worker"
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 30)
    assert spec["metrics"] == [{"type": "External", "external": {
        "metric": {"name": "runnable_k8s_scaling_demand",
                   "selector": {"matchLabels": {"service": "rel-worker-pool-broker"}}},
        "target": {"type": "AverageValue", "averageValue": "51200m"}}}]
    assert spec["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 240}
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
def test_hpa_object_and_pods_metrics_and_a_merged_behavior(helm_bin, tmp_path):
    obj = one(render(helm_bin, tmp_path, MODES["hpa-object"]), "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert obj["type"] == "Object"
    assert obj["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": "rel-worker-pool-broker"}
    assert obj["object"]["target"] == {"type": "AverageValue", "averageValue": "51200m"}
    pods = one(render(helm_bin, tmp_path, MODES["hpa-pods"]), "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert pods == {"type": "Pods", "pods": {"metric": {"name": "runnable_k8s_scaling_demand"},
                                             "target": {"type": "AverageValue", "averageValue": "51200m"}}}
    tuned = deep_merge(HPA, {"worker": {"slots": 16},
                             "autoscaling": {"targetTasksPerSlot": 1.0, "hpa": {"metric": {"name": "rk8s_demand"}},
                                             "behavior": {"scaleDown": {"policies": [
                                                 {"type": "Pods", "value": 1, "periodSeconds": 60}]}}}})
    spec = one(render(helm_bin, tmp_path, tuned), "HorizontalPodAutoscaler")["spec"]
    # The target never counts on more calls per worker than its slots: min(64, 16) x 1.0.
    assert spec["metrics"][0]["external"]["target"]["averageValue"] == "16"
    assert spec["metrics"][0]["external"]["metric"]["name"] == "rk8s_demand"
    assert spec["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 240,
                                             "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}


REFUSED = {
    "a mode without enabled": ({"autoscaling": {"mode": "keda"}, "metrics": {"enabled": True}},
                               "autoscaling.mode=keda takes effect only with autoscaling.enabled=true"),
    "keda without metrics": ({"autoscaling": {"enabled": True, "mode": "keda"}},
                             "autoscaling.mode=keda scales on the load the broker publishes on its metrics port"),
    "hpa without metrics": ({"autoscaling": {"enabled": True, "mode": "hpa"}},
                            "autoscaling.mode=hpa scales on the load the broker publishes on its metrics port"),
    "hpa to zero": (deep_merge(HPA, {"autoscaling": {"minReplicas": 0}}),
                    "autoscaling.mode=hpa cannot scale to zero"),
    "prometheus without a server": (deep_merge(KEDA, {"autoscaling": {"keda": {"trigger": "prometheus"}}}),
                                    "trigger=prometheus needs autoscaling.keda.prometheus.serverAddress"),
    "a poll slower than the queue timeout": (deep_merge(KEDA, {"autoscaling": {"keda": {"pollingInterval": 120}}}),
                                             "must be shorter than broker.queueTimeout"),
    "a window the HPA refuses": (deep_merge(HPA, {"autoscaling": {"stabilizationWindowSeconds": 7200}}),
                                 "the most a HorizontalPodAutoscaler accepts"),
    "an unknown mode": ({"autoscaling": {"enabled": True, "mode": "vpa"}}, "/autoscaling/mode"),
    "min above max in keda": (deep_merge(KEDA, {"autoscaling": {"minReplicas": 20}}),
                              "autoscaling.minReplicas (20) must not exceed autoscaling.maxReplicas (12)"),
}


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_helm_refuses_combinations_that_cannot_scale_with_a_message(helm_bin, tmp_path, case):
    values, message = REFUSED[case]
    assert message in refusal(helm_bin, tmp_path, values)


# ------------------------------------------------------------------ the chart's target = the broker's
@contextlib.contextmanager
def _process(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=log, text=True)
        try:
            yield process
        finally:
            stop_process(process)


def _scaling(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/scaling", timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.cluster  # the helm CLI is built by the cluster tier, as for tests/test_chart.py
@pytest.mark.timeout(120)
def test_the_target_keda_and_the_hpa_divide_by_is_the_one_the_broker_publishes(helm_bin, tmp_path):
    """A real broker started with the flags the chart gives it in keda mode, and a real worker
    with the chart's --slots, publish on /scaling the same target per worker as the chart wrote
    into the ScaledObject and the HPA (here capped by the worker's 16 slots: min(64, 16) x 0.5),
    and the `demand` field the metrics-api trigger reads."""
    values = {"worker": {"slots": 16}, "autoscaling": {"targetTasksPerSlot": 0.5}}
    keda_docs = render(helm_bin, tmp_path, deep_merge(KEDA, values))
    hpa_docs = render(helm_bin, tmp_path, deep_merge(HPA, values))
    trigger = one(keda_docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    average = one(hpa_docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["external"]["target"]["averageValue"]
    assert (trigger["targetValue"], average) == ("8", "8")
    flags = [a for a in broker_command(keda_docs) if a.startswith("--autoscale")]
    worker_slots = [a for a in one(keda_docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
                    ["command"] if a.startswith("--slots=")]
    assert worker_slots == ["--slots=16"]

    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    broker_args = ["-m", "pool", "broker", "--bind", endpoint, "--insecure", "--metrics-port", str(port),
                   "--metrics-bind", "127.0.0.1", "--exit-with-parent", str(os.getpid()), *flags]
    with _process(broker_args) as broker:
        before = wait_for(lambda: _scaling(port), 30, "the broker's /scaling", ignore=(OSError,))
        assert before["demand"] == 0 and trigger["valueLocation"] in before
        with _process(["-m", "worker", "--connect", endpoint, "--insecure", *worker_slots]) as worker:
            signal = wait_for(lambda: (s := _scaling(port))["target_per_worker"] == float(trigger["targetValue"])
                              and s, 60, "the worker's slots in the broker's target per worker")
            assert broker.poll() is None and worker.poll() is None
    assert signal["demand"] == 0
