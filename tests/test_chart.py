"""The worker-pool Helm chart, with the real helm CLI: lint, render, and every manifest checked
against the Kubernetes schemas of the releases we support; values.schema.json refuses bad values.

The schema test at the top needs no helm binary, so the schema is exercised everywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.helm import CHART, helm, values_file
from worker import defaults

SUPPORTED_KUBERNETES = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),  # not in the Kubernetes schemas
        ("monitoring.coreos.com/v1", "PrometheusRule")}

# Every optional feature on at once.
EVERYTHING_ON: dict[str, Any] = {
    "commonLabels": {"team": "llm"},
    "image": {"registry": "registry.example.com/team", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "curve": {"enabled": True, "existingSecret": "pool-keys", "testClient": "alice"},
    "broker": {"extraArgs": ["--queue-size=50"], "queueBytes": 100000000, "runnableStoreBytes": 50000000,
               "extraEnv": [{"name": "A", "value": "1"}],
               "podAnnotations": {"a": "b"}, "podLabels": {"c": "d"}, "nodeSelector": {"pool": "brokers"},
               "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
               "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                   {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}}},
    "service": {"type": "ClusterIP", "port": 6000, "annotations": {"team": "llm"}},
    "worker": {
        "replicas": 3, "slots": 16, "gracePeriodSeconds": 90, "terminationGracePeriodSeconds": 120,
        "llmSecretName": "runnable-k8s-ee",
        "extraEnv": [{"name": "LANGSMITH_TRACING", "value": "false"}],
        "extraEnvFrom": [{"configMapRef": {"name": "settings"}}],
        "extraArgs": ["--log-level=DEBUG"],
        "podAnnotations": {"e": "f"}, "podLabels": {"g": "h"}, "nodeSelector": {"pool": "llm"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/component": "worker"}}}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}}}],
        "serviceAccountName": "workers",
        "checkpointer": {"factory": "team_store.checkpointers:postgres",
                         "urlSecret": {"name": "checkpoints", "key": "dsn"}},
    },
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
    "serviceAccount": {"create": True, "name": "pool-broker", "annotations": {"i": "j"}},
    "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 20, "targetTasksPerSlot": 0.8,
                    "stabilizationWindowSeconds": 45, "scaleToZeroIdleSeconds": 600},
    "metrics": {"enabled": True, "port": 9100, "podAnnotations": True,
                "from": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}],
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
                "dashboard": {"enabled": True}, "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}},
    "networkPolicy": {"enabled": True, "clientPodLabels": {"llm-client": "yes"},
                      "clientNamespaceSelector": {"matchLabels": {"team": "llm"}},
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                      "workers": {"allowMetadataEgress": True}},
}


# ------------------------------------------------------------------ no helm needed
def load_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def load_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.timeout(30)
def test_values_yaml_fits_its_own_schema():
    schema = load_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(load_values(), schema)
    jsonschema.validate(deep_merge(load_values(), EVERYTHING_ON), schema)
    for address in ("tcp://127.0.0.1:5555", "tcp://pool-worker-pool-broker.team-a.svc:5555", "tcp://[fd00::1]:5555"):
        jsonschema.validate(deep_merge(load_values(), {"worker": {"brokerAddress": address}}), schema)


BAD_VALUES = {
    "negative replicas": {"worker": {"replicas": -1}},
    "slots not a number": {"worker": {"slots": "x"}},
    "zero slots": {"worker": {"slots": 0}},
    "zero slots under the old name": {"worker": {"concurrency": 0}},
    "unknown top-level key": {"workerz": {"replicas": 2}},
    "unknown worker key": {"worker": {"replica": 2}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "broker address not tcp": {"worker": {"brokerAddress": "http://broker:5555"}},
    "broker address without a port": {"worker": {"brokerAddress": "tcp://broker"}},
    "port out of range": {"service": {"port": 70000}},
    "the old one-Secret allow-list": {"curve": {"authorizedClientKeys": ["client.key"]}},
    "test client name not a DNS label": {"curve": {"testClient": "Alice_1"}},
    "test client name too long": {"curve": {"testClient": "a" * 41}},
    "queue bytes not a number": {"broker": {"queueBytes": "lots"}},
    "non-positive autoscaling target": {"autoscaling": {"targetTasksPerSlot": 0}},
    "bad service type": {"service": {"type": "Ingress"}},
    "metadata egress not a boolean": {"networkPolicy": {"workers": {"allowMetadataEgress": "yes"}}},
    "egress rules not a list": {"networkPolicy": {"workers": {"egressRules": {"to": []}}}},
    "the old worker egress switch": {"networkPolicy": {"workerEgress": {"enabled": True}}},
    "checkpointer factory not an import path": {"worker": {"checkpointer": {"factory": "team_store/postgres"}}},
    "checkpointer factory without its name": {"worker": {"checkpointer": {"factory": "team_store.checkpointers"}}},
    "checkpointer as a bare string": {"worker": {"checkpointer": "worker.checkpointers:sqlite"}},
    "checkpointer Secret key without its Secret": {"worker": {"checkpointer": {"urlSecret": {"key": "dsn"}}}},
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_the_schema_refuses_bad_values(case):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(deep_merge(load_values(), BAD_VALUES[case]), load_schema())


# ------------------------------------------------------------------ with the helm CLI
def render(helm_bin: str, tmp_path: Path, values: dict | None = None, *, kube: str = "1.33",
           namespace: str = "team-a", release: str = "rel") -> list[dict]:
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", f"{kube}.0"]
    if values is not None:
        args += ["-f", values_file(tmp_path, values)]
    result = helm(helm_bin, *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind
            and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = by_kind(docs, kind, component)
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_helm_lint_strict_is_clean(helm_bin, tmp_path, values):
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        args += ["-f", values_file(tmp_path, values)]
    result = helm(helm_bin, *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kube", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_every_rendered_manifest_validates_strictly(helm_bin, tmp_path, kube, values):
    docs = render(helm_bin, tmp_path, values, kube=kube)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "Pod", "PodDisruptionBudget",
                "Service", "ServiceAccount"]
    if values is EVERYTHING_ON:
        expected += ["ConfigMap", "PrometheusRule", "Role", "RoleBinding", "ServiceMonitor"]
    assert kinds == sorted(expected)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, kube, strict=True)


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_defaults_render_a_keyed_pool_with_meaningful_probes(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, namespace="team-a", release="rel")
    broker, worker = one(docs, "Deployment", "broker"), one(docs, "Deployment", "worker")
    service = one(docs, "Service")
    # What `k8s://team-a/rel` clients look for: the Service and its Pods by these labels, port "zmq".
    for labels in (service["metadata"]["labels"], broker["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/component"] == "broker"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert service["metadata"]["name"] == "rel-worker-pool-broker"
    assert [p["name"] for p in service["spec"]["ports"]] == ["zmq"] and service["spec"]["ports"][0]["port"] == 5555
    assert service["spec"]["selector"] == broker["spec"]["selector"]["matchLabels"]

    b = container(broker)
    assert b["image"] == "runnable-k8s-worker:0.1.0" and b["imagePullPolicy"] == "IfNotPresent"
    assert b["command"][:3] == ["runnable-k8s", "broker", "--bind=tcp://0.0.0.0:5555"]
    assert "--keys=/etc/runnable-k8s/keys" in b["command"] and "--insecure" not in b["command"]
    assert not any(a.startswith(("--metrics-port", "--autoscale")) for a in b["command"])
    assert b["readinessProbe"]["tcpSocket"] == {"port": "zmq"} and b["livenessProbe"]["tcpSocket"] == {"port": "zmq"}
    assert broker["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    w = container(worker)
    assert worker["spec"]["replicas"] == 2
    assert w["command"][:4] == ["python", "-m", "worker", "--connect=tcp://rel-worker-pool-broker.team-a.svc:5555"]
    # The programs' own defaults (worker/defaults.py; tests/test_defaults.py checks values.yaml agrees).
    assert f"--slots={defaults.WORKER_CONCURRENCY}" in w["command"]
    assert f"--threads={defaults.WORKER_THREADS}" in w["command"] and "--health-dir=/tmp/health" in w["command"]
    assert w["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/health/ready"]
    assert w["livenessProbe"]["exec"]["command"] == [
        "sh", "-c", "test $(( $(date +%s) - $(stat -c %Y /tmp/health/alive) )) -lt 30"]
    assert "envFrom" not in w  # no LLM Secret unless asked for
    grace = next(int(a.split("=")[1]) for a in w["command"] if a.startswith("--grace-period="))
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace

    # Restrictive security everywhere, /tmp the only writable place.
    for pod in (broker["spec"]["template"]["spec"], worker["spec"]["template"]["spec"], one(docs, "Pod")["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = pod["containers"][0]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert not by_kind(docs, "Role")
    # Both NetworkPolicies are on by default (the next tests look at what they say).
    assert one(docs, "NetworkPolicy", "broker") and one(docs, "NetworkPolicy", "worker")


def key_mounts(pod_spec: dict) -> dict[str, str]:
    """mount path -> Secret name, for every Secret volume a Pod's (only) container mounts."""
    secrets = {v["name"]: v["secret"] for v in pod_spec["volumes"] if "secret" in v}
    mounts = pod_spec["containers"][0]["volumeMounts"]
    assert all(m.get("readOnly") for m in mounts if m["name"] in secrets)
    assert all(s["defaultMode"] == 0o440 and "items" not in s for s in secrets.values())
    return {m["mountPath"]: secrets[m["name"]]["secretName"] for m in mounts if m["name"] in secrets}


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_each_pod_mounts_only_its_own_roles_secret(helm_bin, tmp_path, values):
    docs = render(helm_bin, tmp_path, values)
    prefix, client = ("pool-keys", "alice") if values else ("runnable-k8s-curve", "default")
    broker, worker, test_pod = one(docs, "Deployment", "broker"), one(docs, "Deployment", "worker"), one(docs, "Pod")
    # The broker: its pair and the two allow-lists of public keys, each at a path of its own (a
    # read-only Secret volume cannot hold another's mount point).
    assert key_mounts(broker["spec"]["template"]["spec"]) == {
        "/etc/runnable-k8s/keys": f"{prefix}-broker",
        "/etc/runnable-k8s/client-keys": f"{prefix}-clients",
        "/etc/runnable-k8s/worker-keys": f"{prefix}-workers"}
    command = container(broker)["command"]
    assert {"--keys=/etc/runnable-k8s/keys", "--client-keys=/etc/runnable-k8s/client-keys",
            "--worker-keys=/etc/runnable-k8s/worker-keys"} <= set(command)
    # A worker: only the worker pair and broker.key; never the broker's Secret or any client's.
    worker_mounts = key_mounts(worker["spec"]["template"]["spec"])
    assert worker_mounts == {"/etc/runnable-k8s/keys": f"{prefix}-worker"}
    assert not any(name == f"{prefix}-broker" or "-client" in name for name in worker_mounts.values())
    assert "--keys=/etc/runnable-k8s/keys" in container(worker)["command"]
    # The helm test Pod is one client: its own Secret only.
    assert key_mounts(test_pod["spec"]) == {"/etc/runnable-k8s/keys": f"{prefix}-client-{client}"}
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["RUNNABLE_K8S_KEYS"] == "/etc/runnable-k8s/keys"
    # The Pods that hold keys make them readable by their fsGroup only (0440 root:fsGroup).
    for spec in (broker["spec"]["template"]["spec"], worker["spec"]["template"]["spec"], test_pod["spec"]):
        assert spec["securityContext"]["fsGroup"] == 10001


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_the_broker_gets_its_memory_limit_and_its_budgets(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path)
    b = container(one(docs, "Deployment", "broker"))
    limit = next(e for e in b["env"] if e["name"] == "RUNNABLE_K8S_MEMORY_LIMIT")
    assert limit["valueFrom"] == {"resourceFieldRef": {"containerName": "broker", "resource": "limits.memory",
                                                       "divisor": "1"}}
    assert b["resources"]["limits"]["memory"] == "512Mi"
    assert {"--queue-size=40000", "--client-queue-size=10000", "--client-queue-bytes=67108864",
            "--max-unread-bytes=67108864"} <= set(b["command"])
    # The store and the queue's bytes follow the memory limit unless set.
    assert not any(a.startswith(("--runnable-store-bytes", "--queue-bytes")) for a in b["command"])
    on = container(one(render(helm_bin, tmp_path, EVERYTHING_ON), "Deployment", "broker"))
    assert {"--queue-bytes=100000000", "--runnable-store-bytes=50000000"} <= set(on["command"])
    assert {"name": "A", "value": "1"} in on["env"]  # broker.extraEnv still comes along


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_every_optional_feature_renders_as_configured(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, EVERYTHING_ON, namespace="team-a", release="rel")
    broker, worker = one(docs, "Deployment", "broker"), one(docs, "Deployment", "worker")
    b, w = container(broker), container(worker)
    assert b["image"] == "registry.example.com/team/runnable-k8s-worker:1.2.3" and b["imagePullPolicy"] == "Always"
    # The autoscaler's flags, exactly as the broker CLI names them; replicas left to it.
    assert [a for a in b["command"] if a.startswith("--autoscale")] == [
        "--autoscale-deployment=rel-worker-pool-worker", "--autoscale-namespace=team-a", "--autoscale-min=0",
        "--autoscale-max=20", "--autoscale-in-flight=64", "--autoscale-target=0.8", "--autoscale-window=45",
        "--autoscale-idle=600"]
    assert "replicas" not in worker["spec"]
    assert "--metrics-port=9100" in b["command"] and "--metrics-bind=0.0.0.0" in b["command"]  # Prometheus reaches it
    assert b["command"][-1] == "--queue-size=50"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in b["ports"]
    annotations = broker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"
    assert annotations["a"] == "b"
    service = one(docs, "Service")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("zmq", 6000), ("metrics", 9100)]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics" and monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

    # Least privilege for the autoscaler: only this release's worker Deployment, only what it needs.
    role = one(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": ["rel-worker-pool-worker"],
         "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["rel-worker-pool-worker"],
         "verbs": ["get"]}]
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pool-broker", "namespace": "team-a"}]
    assert broker["spec"]["template"]["spec"]["serviceAccountName"] == "pool-broker"
    assert broker["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "workers"
    assert worker["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    # Workers: LLM keys from the Secret, extra env, scheduling, drain time.
    assert w["envFrom"] == [{"secretRef": {"name": "runnable-k8s-ee"}}, {"configMapRef": {"name": "settings"}}]
    assert {"name": "LANGSMITH_TRACING", "value": "false"} in w["env"]
    assert "--slots=16" in w["command"] and "--grace-period=90" in w["command"]
    assert "--connect=tcp://rel-worker-pool-broker.team-a.svc:6000" in w["command"]
    spec = worker["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["nodeSelector"] == {"pool": "llm"} and spec["tolerations"][0]["key"] == "gpu"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert "podAntiAffinity" in spec["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert worker["metadata"]["labels"]["team"] == "llm"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == "25%"

    # NetworkPolicy: the broker's zmq port only from this release's workers and labelled clients.
    policy = one(docs, "NetworkPolicy", "broker")
    assert policy["spec"]["podSelector"]["matchLabels"] == broker["spec"]["selector"]["matchLabels"]
    zmq_rule, metrics_rule = policy["spec"]["ingress"]
    assert zmq_rule["ports"] == [{"port": "zmq", "protocol": "TCP"}]
    assert zmq_rule["from"] == [
        {"podSelector": {"matchLabels": worker["spec"]["selector"]["matchLabels"]}},
        {"podSelector": {"matchLabels": {"llm-client": "yes"}}},
        {"podSelector": {"matchLabels": {"llm-client": "yes"}}, "namespaceSelector": {"matchLabels": {"team": "llm"}}}]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == [{"podSelector": {"matchLabels": {"app": "prometheus"}}},
                                    {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    # The helm test Pod is a labelled client, so it passes the policy.
    assert one(docs, "Pod")["metadata"]["labels"]["llm-client"] == "yes"


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_the_worker_checkpointer_renders_its_environment_from_a_value_or_a_secret(helm_bin, tmp_path):
    def checkpointer_env(values: dict | None) -> list[dict]:
        env = container(one(render(helm_bin, tmp_path, values), "Deployment", "worker"))["env"]
        return [e for e in env if e["name"].startswith("RUNNABLE_K8S_CHECKPOINTER")]

    assert checkpointer_env(None) == []  # none by default: threads stay on their worker
    sqlite = {"factory": "worker.checkpointers:sqlite", "url": "/data/checkpoints.sqlite"}
    assert checkpointer_env({"worker": {"checkpointer": sqlite}}) == [
        {"name": "RUNNABLE_K8S_CHECKPOINTER", "value": "worker.checkpointers:sqlite"},
        {"name": "RUNNABLE_K8S_CHECKPOINTER_URL", "value": "/data/checkpoints.sqlite"}]
    secret = {"factory": "team_store.checkpointers:postgres", "url": "ignored",
              "urlSecret": {"name": "checkpoints", "key": "dsn"}}
    assert checkpointer_env({"worker": {"checkpointer": secret}}) == [
        {"name": "RUNNABLE_K8S_CHECKPOINTER", "value": "team_store.checkpointers:postgres"},
        {"name": "RUNNABLE_K8S_CHECKPOINTER_URL", "valueFrom": {"secretKeyRef": {"name": "checkpoints", "key": "dsn"}}}]
    # A URL without a factory configures nothing (the worker would ignore it).
    assert checkpointer_env({"worker": {"checkpointer": {"url": "/data/checkpoints.sqlite"}}}) == []


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_worker_concurrency_the_old_name_of_worker_slots_still_sets_the_slots(helm_bin, tmp_path):
    old = container(one(render(helm_bin, tmp_path, {"worker": {"concurrency": 7}}), "Deployment", "worker"))
    assert "--slots=7" in old["command"] and not any(a.startswith("--concurrency") for a in old["command"])
    new = container(one(render(helm_bin, tmp_path, {"worker": {"slots": 9}}), "Deployment", "worker"))
    assert "--slots=9" in new["command"]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_probes_can_be_turned_off_and_the_broker_address_overridden(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, {
        "broker": {"hostNetwork": True, "port": 17555}, "tests": {"hostNetwork": True},
        "worker": {"hostNetwork": True, "brokerAddress": "tcp://127.0.0.1:17555", "probes": {"enabled": False}}})
    broker, worker, test_pod = one(docs, "Deployment", "broker"), one(docs, "Deployment", "worker"), one(docs, "Pod")
    w = container(worker)
    assert "readinessProbe" not in w and "livenessProbe" not in w
    assert "--health-dir=/tmp/health" not in w["command"]
    assert "--connect=tcp://127.0.0.1:17555" in w["command"]
    assert "--bind=tcp://0.0.0.0:17555" in container(broker)["command"]
    for spec in (broker["spec"]["template"]["spec"], worker["spec"]["template"]["spec"], test_pod["spec"]):
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["RUNNABLE_K8S_POOL"] == "tcp://127.0.0.1:17555"


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_an_insecure_broker_needs_an_explicit_acknowledgement(helm_bin, tmp_path):
    # The NetworkPolicy is on by default, so it cannot stand for the word a plaintext broker needs.
    for policy in ("true", "false"):
        refused = helm(helm_bin, "template", "rel", str(CHART), "--kube-version", "1.33.0",
                       "--set", "curve.enabled=false", "--set", f"networkPolicy.enabled={policy}", tmp_path=tmp_path)
        assert refused.returncode != 0 and "--insecure" in refused.stderr
        assert "curve.insecureAcknowledged=true" in refused.stderr and "runnable-k8s keys" in refused.stderr
    for allowed in ({"curve": {"enabled": False, "insecureAcknowledged": True}},
                    {"curve": {"enabled": False, "insecureAcknowledged": True}, "networkPolicy": {"enabled": False}}):
        docs = render(helm_bin, tmp_path, allowed)
        b = container(one(docs, "Deployment", "broker"))
        assert "--insecure" in b["command"] and not any(a.startswith("--keys") for a in b["command"])
        for spec in (one(docs, "Deployment", "worker")["spec"]["template"]["spec"], one(docs, "Pod")["spec"]):
            assert all(v["name"] != "curve-keys" for v in spec["volumes"])


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_termination_grace_must_exceed_the_drain_period(helm_bin, tmp_path):
    result = helm(helm_bin, "template", "rel", str(CHART), "--kube-version", "1.33.0",
                  "--set", "worker.gracePeriodSeconds=60", "--set", "worker.terminationGracePeriodSeconds=60",
                  tmp_path=tmp_path)
    assert result.returncode != 0 and "must be greater than worker.gracePeriodSeconds" in result.stderr


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_helm_refuses_values_the_schema_forbids(helm_bin, tmp_path, case):
    result = helm(helm_bin, "template", "rel", str(CHART), "--kube-version", "1.33.0",
                  "-f", values_file(tmp_path, BAD_VALUES[case]), tmp_path=tmp_path)
    assert result.returncode != 0, f"helm accepted {BAD_VALUES[case]}"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


def render_notes(helm_bin: str, tmp_path: Path, values: dict | None = None) -> str:
    """NOTES.txt as `helm install` would print it. (`helm template` never shows the notes, and
    `helm install --dry-run` needs a cluster, so a copy of the chart renders them as a ConfigMap.)"""
    copy = tmp_path / "chart-copy"
    shutil.copytree(CHART, copy)
    notes = (copy / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "notes-as-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        + "".join(f"    {line}\n" for line in notes.splitlines()))
    args = ["template", "rel", str(copy), "-n", "team-a", "--show-only", "templates/notes-as-configmap.yaml"]
    if values is not None:
        args += ["-f", values_file(tmp_path, values)]
    result = helm(helm_bin, *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["data"]["notes"]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_notes_say_how_to_connect_in_the_cluster_and_from_a_laptop(helm_bin, tmp_path):
    notes = render_notes(helm_bin, tmp_path)
    assert 'pool="tcp://rel-worker-pool-broker.team-a:5555"' in notes
    assert 'pool="k8s://team-a/rel"' in notes
    assert "helm test rel -n team-a" in notes
    assert "kubectl -n team-a scale deployment/rel-worker-pool-worker" in notes
    assert "runnable-k8s scale 4 --release rel -n team-a" in notes
    everything = render_notes(helm_bin, tmp_path / "on", EVERYTHING_ON)
    assert "llm-client=yes" in everything and "autoscaled 0..20" in everything and ":9100/metrics" in everything



@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["builtin", "keda", "hpa"])
def test_notes_say_who_scales_the_workers_in_each_mode(helm_bin, tmp_path, mode):
    notes = render_notes(helm_bin, tmp_path, {"autoscaling": {"enabled": True, "mode": mode, "minReplicas": 1},
                                              "metrics": {"enabled": True}})
    says = {"builtin": "the broker sets the replicas of deployment/rel-worker-pool-worker",
            "keda": "KEDA's ScaledObject rel-worker-pool-worker sets the replicas",
            "hpa": "the HorizontalPodAutoscaler rel-worker-pool-worker sets the replicas"}
    assert says[mode] in notes, notes
    assert all(other not in notes for key, other in says.items() if key != mode), notes

# ------------------------------------------------------------------ what the chart refuses and admits
INSECURE_FIX = "Turn CURVE keys on"


def refused(helm_bin: str, tmp_path: Path, values: dict) -> str:
    result = helm(helm_bin, "template", "rel", str(CHART), "--kube-version", "1.33.0",
                  "-f", values_file(tmp_path, values), tmp_path=tmp_path)
    assert result.returncode != 0, f"helm rendered {values}"
    return result.stderr


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("acknowledged", [False, True], ids=["policy", "policy-and-acknowledged"])
def test_insecure_mode_is_refused_on_the_hosts_network(helm_bin, tmp_path, acknowledged):
    """A NetworkPolicy does not cover a port opened on the node: no plaintext broker there, whatever
    else is set."""
    message = refused(helm_bin, tmp_path, {
        "curve": {"enabled": False, "insecureAcknowledged": acknowledged},
        "networkPolicy": {"enabled": True}, "broker": {"hostNetwork": True}})
    assert "curve.enabled=false is refused with broker.hostNetwork=true" in message
    assert "no NetworkPolicy applies" in message
    assert INSECURE_FIX in message and "set broker.hostNetwork=false" in message


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_insecure_mode_is_refused_behind_a_service_reachable_from_outside(helm_bin, tmp_path, service_type):
    message = refused(helm_bin, tmp_path, {
        "curve": {"enabled": False, "insecureAcknowledged": True},
        "networkPolicy": {"enabled": True}, "service": {"type": service_type}})
    assert f"curve.enabled=false is refused with service.type={service_type}" in message
    assert INSECURE_FIX in message and "set service.type=ClusterIP" in message


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_keyed_pools_may_still_use_the_hosts_network_and_any_service_type(helm_bin, tmp_path):
    for values in ({"broker": {"hostNetwork": True}}, {"service": {"type": "NodePort"}},
                   {"service": {"type": "LoadBalancer"}}):
        docs = render(helm_bin, tmp_path, values)
        assert "--keys=/etc/runnable-k8s/keys" in container(one(docs, "Deployment", "broker"))["command"]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_clients_are_admitted_by_a_label_of_this_release_only(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, {"networkPolicy": {"enabled": True}}, release="rel")
    policy = one(docs, "NetworkPolicy", "broker")
    (zmq_rule,) = policy["spec"]["ingress"]
    workers = one(docs, "Deployment", "worker")["spec"]["selector"]["matchLabels"]
    assert zmq_rule["from"] == [{"podSelector": {"matchLabels": workers}},
                                {"podSelector": {"matchLabels": {"rel-worker-pool-client": "true"}}}]
    assert workers["app.kubernetes.io/instance"] == "rel"  # the release's own selector, not any worker's
    assert "runnable-k8s-client" not in json.dumps(policy)  # the old generic label opens nothing
    assert one(docs, "Pod")["metadata"]["labels"]["rel-worker-pool-client"] == "true"  # helm test passes
    # Another release's clients do not pass this one's policy.
    other = one(render(helm_bin, tmp_path, {"networkPolicy": {"enabled": True}}, release="other"),
                "NetworkPolicy", "broker")
    assert {"rel-worker-pool-client": "true"} not in [
        peer["podSelector"]["matchLabels"] for peer in other["spec"]["ingress"][0]["from"]]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_the_client_label_is_a_valid_label_name_for_the_longest_release_name(helm_bin, tmp_path):
    import re

    release = "a" * 53  # Helm's own limit on release names
    docs = render(helm_bin, tmp_path, {"networkPolicy": {"enabled": True}}, release=release)
    (key,) = one(docs, "Pod")["metadata"]["labels"].keys() - {
        "helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
        "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of"}
    assert key.endswith("-client") and len(key) <= 63
    assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_the_metrics_port_is_closed_unless_someone_is_named_to_scrape_it(helm_bin, tmp_path):
    base = {"networkPolicy": {"enabled": True}, "metrics": {"enabled": True}}
    closed = one(render(helm_bin, tmp_path, base), "NetworkPolicy", "broker")
    assert [rule["ports"] for rule in closed["spec"]["ingress"]] == [[{"port": "zmq", "protocol": "TCP"}]]
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for values in ({"metrics": {"from": prometheus}}, {"networkPolicy": {"metricsFrom": prometheus}}):
        policy = one(render(helm_bin, tmp_path, deep_merge(base, values)), "NetworkPolicy", "broker")
        _, metrics_rule = policy["spec"]["ingress"]
        assert metrics_rule == {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": prometheus}
        kubernetes_validate.validate(policy, "1.33", strict=True)
    notes = render_notes(helm_bin, tmp_path / "notes", base)
    assert "closed by the NetworkPolicy: name who may scrape it in metrics.from" in notes


METADATA_V4, METADATA_V6 = "169.254.169.254/32", "fd00:ec2::254/128"


def egress_rules(docs: list[dict]) -> tuple[dict, dict, list[dict]]:
    """The worker egress policy's DNS rule, broker rule and the rules after them."""
    policy = one(docs, "NetworkPolicy", "worker")
    assert policy["spec"]["podSelector"]["matchLabels"] == one(docs, "Deployment", "worker")["spec"]["selector"][
        "matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    dns, broker, *rest = policy["spec"]["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert broker["to"] == [{"podSelector": {"matchLabels": one(docs, "Deployment", "broker")["spec"]["selector"][
        "matchLabels"]}}]
    return dns, broker, rest


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kube", SUPPORTED_KUBERNETES)
def test_by_default_workers_reach_dns_the_broker_and_every_address_but_the_cloud_metadata_endpoint(
        helm_bin, tmp_path, kube):
    docs = render(helm_bin, tmp_path, kube=kube)  # the chart's defaults: the policies are on
    kubernetes_validate.validate(one(docs, "NetworkPolicy", "worker"), kube, strict=True)
    kubernetes_validate.validate(one(docs, "NetworkPolicy", "broker"), kube, strict=True)
    _, broker, rest = egress_rules(docs)
    assert broker["ports"] == [{"port": 5555, "protocol": "TCP"}]
    (anywhere,) = rest
    assert "ports" not in anywhere  # any port: an LLM API on 443, a proxy on 3128, ...
    assert anywhere["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [METADATA_V4]}},
                              {"ipBlock": {"cidr": "::/0", "except": [METADATA_V6]}}]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_allow_metadata_egress_drops_the_exception(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, {"networkPolicy": {"workers": {"allowMetadataEgress": True}}})
    _, _, rest = egress_rules(docs)
    assert rest == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]}]
    assert METADATA_V4 not in json.dumps(docs)
    kubernetes_validate.validate(one(docs, "NetworkPolicy", "worker"), "1.33", strict=True)


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_worker_egress_rules_can_be_replaced_or_emptied(helm_bin, tmp_path):
    proxy = [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}]
    docs = render(helm_bin, tmp_path, {"networkPolicy": {"workers": {"egressRules": proxy}}})
    assert egress_rules(docs)[2] == proxy
    kubernetes_validate.validate(one(docs, "NetworkPolicy", "worker"), "1.33", strict=True)
    # An empty list: DNS and the broker only.
    assert egress_rules(render(helm_bin, tmp_path, {"networkPolicy": {"workers": {"egressRules": []}}}))[2] == []


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_turning_the_network_policy_off_removes_both_policies(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, {"networkPolicy": {"enabled": False}})
    assert not by_kind(docs, "NetworkPolicy")
    notes = render_notes(helm_bin, tmp_path / "notes", {"networkPolicy": {"enabled": False}})
    assert "no NetworkPolicy: every Pod reaches the broker, and the workers reach the cloud metadata endpoint" in notes


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_notes_say_what_the_worker_egress_policy_allows(helm_bin, tmp_path):
    assert "any address but the cloud metadata endpoint 169.254.169.254" in render_notes(helm_bin, tmp_path)
    allowed = render_notes(helm_bin, tmp_path / "a", {"networkPolicy": {"workers": {"allowMetadataEgress": True}}})
    assert "any address, the cloud metadata endpoint included" in allowed


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_notes_tell_client_pods_which_label_to_carry(helm_bin, tmp_path):
    notes = render_notes(helm_bin, tmp_path, {"networkPolicy": {"enabled": True}})
    assert "rel-worker-pool-client=true" in notes and 'rel-worker-pool-client: "true"' in notes
    assert "the keys are the real check" in notes
