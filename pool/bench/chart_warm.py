"""Warm calls through an installed worker-pool chart, for ``runnable-k8s bench --launcher kubernetes``.

On Kubernetes a Pod per call is compared with *the chart's* worker Pods, not only with a local
pool on the bench's host: the warm figure a cluster user gets is the chart's. It is read from two
places, in the same run as the Pod-per-call figures:

* ``client_pod``: a Pod in the release's namespace running the worker image as a client, calling
  the broker by its Service (``tcp://SERVICE:PORT``, resolved by the cluster's DNS), with the
  chart's client keys mounted when the chart uses keys. What an application deployed next to the
  pool sees.
* ``k8s_url``: this host calling ``k8s://NAMESPACE/RELEASE`` (the API server's port-forward to the
  broker Pod). What a laptop or a CI job outside the cluster sees.

Both run the same command, ``runnable-k8s bench --pool ADDRESS --modes warm`` (so the figures
have exactly the shape of the bench's warm mode, and both ends of the wire come from one image
when the client is a Pod); only the address and where the process runs differ. The bench runs as
a child process, so this module does not import :mod:`pool.bench.command`, which imports it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pool.errors import RunnableK8sError

# The chart's names (charts/worker-pool): its components are labelled with the release and the
# component, the broker's Service port is named "zmq", the broker mounts PREFIX-broker as the
# volume "curve-keys" (PREFIX = curve.existingSecret), each client's keys are PREFIX-client-NAME,
# and the NetworkPolicy admits Pods labelled FULLNAME-client: "true" (FULLNAME-broker is the Service).
COMPONENT_SELECTOR = "app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"
BROKER_KEYS_VOLUME = "curve-keys"
POD_KEYS_DIR = "/etc/runnable-k8s/keys"
RESULT_MARKER = "=== runnable-k8s chart-warm result ==="
POD_USER = 10001  # the worker image's user, as the chart runs it

# Runs in the client Pod: the bench with the given arguments, its table to stderr, then the
# marker and the JSON it wrote, as the last thing in the Pod's log.
POD_PROGRAM = f"""\
import subprocess, sys
out = "/tmp/chart-warm.json"
done = subprocess.run([sys.executable, "-m", "pool", "bench", *sys.argv[1:], "--json", out], stdout=sys.stderr)
if done.returncode:
    sys.exit(done.returncode)
print({RESULT_MARKER!r})
print(open(out).read(), flush=True)
"""


def measure_chart_warm(namespace: str, release: str, *, image: str, calls: int, in_flight: list[int],
                       kubeconfig: str | None, progress: Callable[[str], None],
                       workloads: Sequence[str] = ("echo", "io"), slow_calls: int | None = None,
                       throughput_seconds: float = 2.0, client: str = "default", client_secret: str | None = None,
                       keys: str | None = None, image_pull_policy: str | None = "IfNotPresent",
                       extra_args: Sequence[str] = (), timeout: float = 900.0) -> dict[str, Any]:
    """Warm figures of the chart release ``namespace/release``, from a client Pod and from this host.

    Returns ``{"client_pod": {...}, "k8s_url": {...}, "chart": {...}}``: each of the first two is
    the bench's warm-mode dict (``workloads`` -> ``echo``/``io`` -> ``p50_ms``/``p95_ms``/
    ``p99_ms``/... and ``throughput_by_concurrency`` per calls in flight), plus the ``address``
    called, the in-process figures and the bare floor measured where that client ran; ``chart``
    says what was found (the Service, the key Secret).

    Keys: when the chart's broker mounts CURVE keys, the client Pod mounts the Secret
    ``PREFIX-client-CLIENT`` (or ``client_secret``) and this host uses ``keys`` (a client key
    folder) or else that Secret's files, written to a private temporary folder removed afterwards.
    The Pod is deleted whatever happens. ``slow_calls`` (io) defaults to a tenth of ``calls``."""
    from pool.k8s.core import core_api

    core = core_api(kubeconfig)
    try:
        service, port = _broker_service(core, namespace, release)
        secret = client_secret or _client_secret(core, namespace, release, client)
        bench_args = _bench_args(workloads, calls, slow_calls if slow_calls is not None else max(5, calls // 10),
                                 in_flight, throughput_seconds, extra_args)
        chart = {"namespace": namespace, "release": release, "service": service, "port": port,
                 "client_secret": secret, "image": image}
        address = f"tcp://{service}:{port}"
        progress(f"client Pod -> {address}")
        in_pod = _run_client_pod(core, namespace, image, image_pull_policy, address, secret,
                                 _client_labels(service, release), bench_args, timeout)
        url = f"k8s://{namespace}/{release}"
        progress(f"this host -> {url}")
        with _host_keys(core, namespace, secret, keys) as key_dir:
            on_host = _run_host_bench(url, key_dir, kubeconfig, bench_args, timeout)
    finally:
        core.api_client.close()
    return {"client_pod": _warm_figures(in_pod, address), "k8s_url": _warm_figures(on_host, url), "chart": chart}


def _bench_args(workloads: Sequence[str], calls: int, slow_calls: int, in_flight: list[int],
                throughput_seconds: float, extra_args: Sequence[str]) -> list[str]:
    """The warm-only bench both clients run: no scaling run, no 1 MB runnable, a short floor."""
    return ["--modes", "warm", "--workload", ",".join(workloads), "--calls", str(calls),
            "--slow-calls", str(slow_calls), "--in-flight", ",".join(str(n) for n in in_flight),
            "--throughput-seconds", str(throughput_seconds), "--workers", "0", "--no-big-runnable",
            "--no-progress", "--pool-workers", "1", "--floor-tasks", str(max(200, 10 * calls)), *extra_args]


def _warm_figures(results: dict[str, Any], address: str) -> dict[str, Any]:
    """The warm mode of one bench run, with what it is read against (in-process, the bare floor)."""
    try:
        warm = dict(results["modes"]["warm"])
    except KeyError as exc:
        raise RunnableK8sError(f"the bench against {address} wrote no warm figures ({sorted(results)})") from exc
    warm["address"] = address
    warm["in_process"] = results.get("in_process", {}).get("workloads", {})
    warm["floor"] = results.get("floor")
    warm["environment"] = {key: results.get("environment", {}).get(key)
                           for key in ("python", "cpu_model", "load_average_at_start", "command")}
    return warm


# ---------------------------------------------------------------------- finding the chart's pieces


def _broker_service(core: Any, namespace: str, release: str) -> tuple[str, int]:
    """The release's broker Service and its ZeroMQ port."""
    selector = COMPONENT_SELECTOR.format(release=release, component="broker")
    services = core.list_namespaced_service(namespace, label_selector=selector).items
    if not services:
        raise RunnableK8sError(f"no broker Service of release {release!r} in namespace {namespace!r} "
                               f"(label selector {selector}): is the worker-pool chart installed there? "
                               "`helm list -n NAMESPACE` shows its releases")
    service = services[0]
    ports = service.spec.ports or []
    port = next((p.port for p in ports if p.name == "zmq"), ports[0].port if ports else 5555)
    return str(service.metadata.name), int(port)


def _client_secret(core: Any, namespace: str, release: str, client: str) -> str | None:
    """``PREFIX-client-CLIENT`` when the release's broker mounts CURVE keys (``PREFIX-broker``),
    else None (a broker run with --insecure, ``curve.enabled=false``)."""
    selector = COMPONENT_SELECTOR.format(release=release, component="broker")
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    for pod in pods:
        for volume in pod.spec.volumes or []:
            if volume.name == BROKER_KEYS_VOLUME and volume.secret is not None:
                prefix = str(volume.secret.secret_name).removesuffix("-broker")
                return f"{prefix}-client-{client}"
    if not pods:
        raise RunnableK8sError(f"no broker Pod of release {release!r} in namespace {namespace!r}: "
                               "wait until `kubectl get pods -n NAMESPACE` shows it Running")
    return None


def _client_labels(service: str, release: str) -> dict[str, str]:
    """The label the chart's NetworkPolicy admits to the broker (its default clientPodLabels), and
    a name tag for whoever lists the namespace's Pods."""
    fullname = service.removesuffix("-broker")
    return {f"{fullname}-client": "true", "app.kubernetes.io/name": "runnable-k8s-bench",
            "app.kubernetes.io/instance": f"{release}-bench"}


@contextmanager
def _host_keys(core: Any, namespace: str, secret: str | None, keys: str | None) -> Iterator[str | None]:
    """The client key folder this host uses: ``keys`` when given, else the files of ``secret``
    copied to a private temporary folder (0700, files 0600) that is removed afterwards."""
    if keys is not None or secret is None:
        yield keys
        return
    from kubernetes.client.rest import ApiException

    try:
        data = core.read_namespaced_secret(secret, namespace).data or {}
    except ApiException as exc:
        raise RunnableK8sError(f"cannot read the client key Secret {namespace}/{secret} ({exc.status} {exc.reason}): "
                               "pass a client key folder (--keys DIR), or create the Secret with "
                               "`runnable-k8s keys DIR --client NAME --k8s-secret PREFIX`") from exc
    folder = tempfile.mkdtemp(prefix="runnable-k8s-chart-keys-")
    try:
        for name, value in data.items():
            path = os.path.join(folder, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(base64.b64decode(value))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- the two clients


def _run_host_bench(address: str, keys: str | None, kubeconfig: str | None, bench_args: list[str],
                    timeout: float) -> dict[str, Any]:
    """The bench on this host against ``address``, as a child process; its JSON."""
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    with tempfile.TemporaryDirectory(prefix="runnable-k8s-chart-warm-") as folder:
        out = os.path.join(folder, "bench.json")
        command = [sys.executable, "-m", "pool", "bench", "--pool", address, *(["--keys", keys] if keys else []),
                   *bench_args, "--json", out]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RunnableK8sError(f"the bench against {address} failed (exit {done.returncode}):\n"
                                   f"{done.stderr[-3000:]}")
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
        return result


def client_pod_manifest(name: str, image: str, image_pull_policy: str | None, address: str, secret: str | None,
                        labels: dict[str, str], bench_args: list[str]) -> dict[str, Any]:
    """The client Pod: the worker image run as its own user, the client keys mounted read-only
    (0440, readable through fsGroup, as the chart mounts keys), no API token."""
    container: dict[str, Any] = {
        "name": "bench", "image": image,
        "command": ["python", "-c", POD_PROGRAM, "--pool", address,
                    *(["--keys", POD_KEYS_DIR] if secret else []), *bench_args],
        "env": [{"name": "HOME", "value": "/tmp"}],
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    spec: dict[str, Any] = {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsUser": POD_USER, "runAsGroup": POD_USER, "fsGroup": POD_USER,
                            "runAsNonRoot": True},
        "containers": [container],
    }
    if secret:
        container["volumeMounts"] = [{"name": "keys", "mountPath": POD_KEYS_DIR, "readOnly": True}]
        spec["volumes"] = [{"name": "keys", "secret": {"secretName": secret, "defaultMode": 0o440}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}


def _run_client_pod(core: Any, namespace: str, image: str, image_pull_policy: str | None, address: str,
                    secret: str | None, labels: dict[str, str], bench_args: list[str],
                    timeout: float) -> dict[str, Any]:
    """Run the client Pod to completion and read the bench's JSON from its log; the Pod is deleted
    whatever happens."""
    from pool.k8s import runner_pods

    name = f"runnable-k8s-bench-{uuid.uuid4().hex[:8]}"
    manifest = client_pod_manifest(name, image, image_pull_policy, address, secret, labels, bench_args)
    runner_pods.create(core, namespace, manifest)
    try:
        pod = _wait_until_ended(core, namespace, name, timeout)
        log = core.read_namespaced_pod_log(name, namespace)
        if pod.status.phase != "Succeeded" or RESULT_MARKER not in log:
            raise RunnableK8sError(f"the client Pod {namespace}/{name} ({pod.status.phase}) gave no figures; "
                                   f"its log ends:\n{log[-3000:]}")
        result: dict[str, Any] = json.loads(log.rsplit(RESULT_MARKER, 1)[1])
        return result
    finally:
        runner_pods.delete_or_warn(core, namespace, name)


def _wait_until_ended(core: Any, namespace: str, name: str, timeout: float) -> Any:
    """The Pod once it has Succeeded or Failed; a Pod that cannot start (its image, its Secret)
    raises at once with the reason, one still running at ``timeout`` raises."""
    from kubernetes import watch

    from pool.errors import PodFailed
    from pool.k8s import runner_pods

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunnableK8sError(f"the client Pod {namespace}/{name} was still running after {timeout:.0f} s; "
                                   "pass a longer timeout or fewer calls")
        watcher = watch.Watch()
        try:
            for event in watcher.stream(core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                                        timeout_seconds=max(1, int(min(remaining, 60)))):
                pod = event["object"]
                if pod.status is None or event["type"] == "DELETED":
                    continue
                if pod.status.phase in ("Succeeded", "Failed"):
                    return pod
                try:
                    runner_pods.started(pod, namespace)
                except PodFailed as failed:
                    raise RunnableK8sError(f"the client Pod cannot run: {failed}") from failed
        finally:
            watcher.stop()
