"""Losing the broker Pod and rolling the workers under load lose no call
(docs/design.md#scaling-and-losing-peers), on the real single-node
test cluster (tests/cluster), with the worker-pool chart installed as a user would.

Three disruptions, each while callers on this host keep calling a small remote runnable:

1. the broker Pod is deleted (default grace): the Deployment starts a new one; the client holds
   the calls in flight (``retries=1``) and resubmits them to the new broker, the workers
   re-register with it on their own. Done for each way the host's client reaches the broker:
   ``tcp://127.0.0.1:PORT`` (a hostNetwork broker; the new Pod binds the same port) and
   ``k8s://NAMESPACE/RELEASE`` (a port-forward through the API server, which must find the NEW
   broker Pod once the old one is gone);
2. ``helm upgrade`` changes a worker Pod annotation, which rolls the worker Deployment;
3. the broker's autoscaler scales the workers down when the load falls.

Each asserts that no call failed and that every result is its own input (none lost, none answered
for another), and prints its figures: recovery time after the broker Pod's deletion, calls served
during the rollout, replicas during the scale-down.

Wiring, chosen per test by the ``wiring`` fixture (``services`` unless a test asks otherwise): the
chart's defaults, the workers reaching the broker by its Service name (the test cluster has
kube-proxy and CoreDNS) and this host's client through ``k8s://``; or ``host-network``, the broker
on a free port of the node that the workers and this host reach at tcp://127.0.0.1:PORT, which the
autoscaler test needs (the test cluster's API server listens only on the host's loopback, so the
``kubernetes`` Service has no endpoints for a broker in the Pod network).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s
from pool.client.connection import Connection
from pool.keys import create_key_directory
from tests.support.callers import Callers
from tests.support.chart_release import (
    RELEASE,
    WORKERS,
    assert_nothing_left,
    create_key_secrets,
    describe,
    pods_left,
    ready_pods,
    require_health_dir,
)
from tests.support.helm import CHART, helm, values_file
from tests.support.ports import free_port
from tests.support.waiting import wait_for
from worker.curve import load_peer_keys

pytestmark = pytest.mark.cluster

CALLERS = 32
# How long a call waits for a broker after losing one: longer than a broker Pod's replacement
# (scheduling, container start, readiness) on a loaded 2-core machine.
PATIENCE = 120.0
# Calls each caller completes through the new broker (or the new workers) before the test stops.
MORE_CALLS = 5


def echo_after_a_nap(shortest: float = 0.05, longest: float = 0.2):
    """A task that sleeps 0.05-0.2 s (or as told) and returns its input with the Pod that ran it.
    Nested, so it travels by value (the worker image has no tests package)."""

    def task(x):
        import os
        import random
        import time

        time.sleep(random.uniform(shortest, longest))
        return {"x": x, "pod": os.environ.get("POD_NAME")}

    return task


def same_input(x: int, out: Any) -> bool:
    return isinstance(out, dict) and out.get("x") == x


# ---------------------------------------------------------------------------- wiring


@dataclass(frozen=True)
class Wiring:
    """How the broker, the workers and a client on this host meet: chart values, and the address
    the host's client uses for ``tcp`` (None if only ``k8s://`` reaches the broker from here)."""

    values: dict[str, Any]
    host_address: str | None


def host_network_wiring(server: str) -> Wiring:
    """The test cluster today: no DNS, no kube-proxy. The broker listens on a free port of the
    node (hostNetwork), the workers reach it at tcp://127.0.0.1:PORT, and so does this host; the
    broker's autoscaler reaches the API server on the host's loopback (``server``)."""
    port, api = free_port(), urlparse(server)
    return Wiring(values={
        "broker": {"hostNetwork": True, "port": port,
                   "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": api.hostname},
                                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api.port)}]},
        "worker": {"hostNetwork": True, "brokerAddress": f"tcp://127.0.0.1:{port}"},
        "tests": {"hostNetwork": True},
    }, host_address=f"tcp://127.0.0.1:{port}")


def service_wiring() -> Wiring:
    """The chart's defaults, for a cluster with kube-proxy and cluster DNS: the workers reach the
    broker by its Service name, the broker's autoscaler the API server by the ``kubernetes``
    Service, and this host's client the broker through ``k8s://`` (there is no tcp:// from here)."""
    return Wiring(values={}, host_address=None)


@pytest.fixture
def wiring(request, k8s_node) -> Wiring:
    """The one place that decides the wiring: ``services`` (the chart's defaults) unless a test
    parametrizes it indirectly with ``host-network``."""
    kind = getattr(request, "param", "services")
    if kind == "host-network":
        return host_network_wiring(k8s_node.control_plane.server)
    assert kind == "services", kind
    return service_wiring()


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key (as helm merges values)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------- the release


@dataclass
class Release:
    cp: Any
    ns: str
    tmp_path: Path
    helm_bin: str
    keys: Path
    wiring: Wiring
    timings: dict[str, float] = field(default_factory=dict)

    def address(self, path: str) -> str:
        """The pool address for a client on this host: ``tcp`` or ``k8s``."""
        if path == "k8s":
            return f"k8s://{self.ns}/{RELEASE}"
        if self.wiring.host_address is None:
            pytest.skip("this wiring gives the host no tcp:// address of the broker")
        return self.wiring.host_address

    def remote(self, path: str, retries: int, nap: tuple[float, float] = (0.05, 0.2)) -> RunnableK8s:
        return RunnableK8s(bound=RunnableLambda(echo_after_a_nap(*nap)), pool=self.address(path), keys=str(self.keys),
                           k8s_config=self.cp.kubeconfig, mode="warm", timeout=60, retries=retries,
                           connect_timeout=PATIENCE)

    def counters(self) -> dict[str, int]:
        """The broker's counters (``runnable-k8s status``), asked with the client's keys."""
        from pool.k8s.portforward import BrokerForward

        address = (self.wiring.host_address
                   or BrokerForward.shared(self.address("k8s"), self.cp.kubeconfig).local_address)
        connection = Connection(address, load_peer_keys(self.keys, "client"), 30.0)
        try:
            return dict(connection.status(timeout=10)["counters"])
        finally:
            connection.close()

    def helm(self, *args: str, timeout: float = 150):
        return helm(self.helm_bin, *args, tmp_path=self.tmp_path, kubeconfig=self.cp.kubeconfig, timeout=timeout)


@contextmanager
def installed(helm_bin: str, cp: Any, ns: str, tmp_path: Path, wiring: Wiring,
              values: dict[str, Any]) -> Iterator[Release]:
    """The chart installed (``--wait``) with keys from `runnable-k8s keys --k8s-secret`; on the way
    out, every client connection closed, the release uninstalled and nothing of it left."""
    core = cp.core()
    keys = create_key_secrets(core, ns, "pool-keys", create_key_directory(tmp_path / "keys"))
    require_health_dir(core, ns)
    base = {
        "image": {"repository": "runnable-k8s-worker", "tag": "latest", "pullPolicy": "Never"},
        "curve": {"enabled": True, "existingSecret": "pool-keys"},
        "broker": {"resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        "worker": {"gracePeriodSeconds": 20, "probes": {"enabled": True},
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
    }
    release = Release(cp, ns, tmp_path, helm_bin, keys, wiring)
    t0 = time.monotonic()
    install = release.helm("install", RELEASE, str(CHART), "-n", ns, "-f",
                           values_file(tmp_path, merged(merged(base, wiring.values), values)),
                           "--wait", "--timeout", "120s")
    release.timings["helm install --wait"] = time.monotonic() - t0
    assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
    try:
        yield release
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        print("timings:", {k: round(v, 2) for k, v in release.timings.items()})
        close_clients()
        uninstall = release.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)


def close_clients() -> None:
    """Every client connection and k8s:// port-forward listener of this process."""
    from pool.k8s.portforward import BrokerForward

    Connection.close_all()
    for forward in list(BrokerForward._shared.values()):
        forward.close()
    BrokerForward._shared.clear()


# ---------------------------------------------------------------------------- what the client saw


class ClientWatch:
    """When the client's connection lost its broker and got one again (its ``ready`` flag, polled
    every 10 ms), and what the client said about the calls in flight when it lost it (its warning
    "...; of the calls in flight, H wait to be resubmitted and F failed")."""

    def __init__(self) -> None:
        self.transitions: list[tuple[float, bool]] = []
        self.losses: list[tuple[float, str, int, int]] = []  # (when, why, held, failed)
        self._stop = threading.Event()
        self._handler = _LossHandler(self.losses)
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ClientWatch:
        logging.getLogger("runnable_k8s.client").addHandler(self._handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        logging.getLogger("runnable_k8s.client").removeHandler(self._handler)

    def _watch(self) -> None:
        last: bool | None = None
        while not self._stop.is_set():
            connections = list(Connection._registry.values())
            ready = bool(connections) and all(c.ready for c in connections)
            if ready != last:
                self.transitions.append((time.monotonic(), ready))
                last = ready
            time.sleep(0.01)

    def lost_after(self, moment: float) -> float | None:
        return next((t for t, ready in self.transitions if t >= moment and not ready), None)

    def back_after(self, moment: float) -> float | None:
        return next((t for t, ready in self.transitions if t >= moment and ready), None)

    @property
    def held(self) -> int:
        return sum(h for _, _, h, _ in self.losses)

    @property
    def failed(self) -> int:
        return sum(f for _, _, _, f in self.losses)


class _LossHandler(logging.Handler):
    def __init__(self, losses: list[tuple[float, str, int, int]]) -> None:
        super().__init__(logging.WARNING)
        self.losses = losses

    def emit(self, record: logging.LogRecord) -> None:
        if "of the calls in flight" in str(record.msg) and isinstance(record.args, tuple) and len(record.args) == 3:
            why, held, failed = record.args
            self.losses.append((time.monotonic(), str(why), int(held), int(failed)))  # type: ignore[call-overload]


def broker_pod(core, ns: str) -> str:
    pods = ready_pods(core, ns, "broker")
    assert len(pods) == 1, pods
    return pods[0]


# ---------------------------------------------------------------------------- 1. broker Pod deleted


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("wiring", "client_path"),
                         [("host-network", "tcp"), ("host-network", "k8s"), ("services", "k8s")],
                         indirect=["wiring"])
def test_deleting_the_broker_pod_under_load_fails_no_call(helm_bin, k8s_node, k8s_namespace, tmp_path, wiring,
                                                          client_path):
    """32 callers with retries=1 and a connect timeout longer than the broker's replacement; the
    broker Pod is deleted (default grace). The calls in flight are held by the client and
    resubmitted to the new broker Pod, which the workers re-register with by themselves."""
    cp = k8s_node.control_plane
    core, ns = cp.core(), k8s_namespace
    values = {"worker": {"replicas": 2, "concurrency": 16, "threads": 16}}
    with installed(helm_bin, cp, ns, tmp_path, wiring, values) as release:
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 2, 90, "two Ready (registered) workers",
                 interval=0.5)
        old_broker = broker_pod(core, ns)
        remote = release.remote(client_path, retries=1)
        assert same_input(7, remote.invoke(7))  # connected, the runnable on the workers
        callers = Callers(remote, CALLERS, same_input)
        with ClientWatch() as watch:
            callers.start()
            try:
                callers.wait_until_each_completed(3, 120)
                deleted_at = time.monotonic()
                core.delete_namespaced_pod(old_broker, ns)
                new_broker = wait_for(lambda: [p for p in ready_pods(core, ns, "broker") if p != old_broker],
                                      180, "a new Ready broker Pod", interval=0.2)[0]
                new_ready_at = time.monotonic()
                callers.wait_until_each_completed(MORE_CALLS, 180, since=new_ready_at)
            finally:
                callers.stop()
        calls = callers.snapshot()
        lost_at, back_at = watch.lost_after(deleted_at), watch.back_after(deleted_at)
        firsts = callers.first_success_after(back_at or deleted_at)
        in_flight = callers.in_flight_at(deleted_at)
        figures = {
            "client path": client_path, "calls": len(calls), "in flight at deletion": in_flight,
            "held for resubmission (client log)": watch.held, "failed at loss (client log)": watch.failed,
            "deletion -> client saw the loss": _since(deleted_at, lost_at),
            "deletion -> client connected again": _since(deleted_at, back_at),
            "deletion -> new broker Pod Ready": round(new_ready_at - deleted_at, 2),
            "deletion -> first call completed through the new broker": _since(deleted_at, min(firsts.values(),
                                                                                        default=None)),
            "deletion -> all callers progressing": _since(deleted_at, max(firsts.values(), default=None)
                                                          if len(firsts) == CALLERS else None),
            "old/new broker Pod": (old_broker, new_broker),
        }
        print("\nbroker Pod deleted under load:", figures)
        assert [c.error for c in callers.errors] == [], f"{len(callers.errors)} calls failed: {figures}"
        assert callers.wrong == [], callers.wrong[:5]
        assert in_flight > 0, "no call was in flight when the broker Pod was deleted"
        assert lost_at is not None and back_at is not None, (
            f"the client never lost its broker (or never got one back): {watch.transitions}")
        assert watch.held > 0 and watch.failed == 0, watch.losses
        assert len(firsts) == CALLERS, f"callers never served after the loss: {set(range(CALLERS)) - set(firsts)}"
        # The workers came back on their own: both registered (Ready) with the new broker.
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 2, 60, "both workers Ready again", interval=0.5)
        counters = release.counters()  # the new broker's
        print("new broker's counters:", counters)
        assert counters["failed"] == 0 and counters["workers_lost"] == 0, counters


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - start, 2)


# ---------------------------------------------------------------------------- 2. helm upgrade


def worker_rollout_done(apps, core, ns: str, replicas: int, old_pods: set[str]) -> bool:
    """The worker Deployment's rollout is complete: every replica updated and Ready, no old Pod left
    (not even terminating)."""
    deployment = apps.read_namespaced_deployment(WORKERS, ns)
    status = deployment.status
    if (status.observed_generation or 0) < deployment.metadata.generation:
        return False
    if (status.updated_replicas, status.ready_replicas, status.replicas) != (replicas, replicas, replicas):
        return False
    pods = set(pods_left(core, ns, "worker"))
    return len(pods) == replicas and not pods & old_pods


@pytest.mark.timeout(600)
def test_a_helm_upgrade_rolling_the_workers_under_load_fails_no_call(helm_bin, k8s_node, k8s_namespace, tmp_path,
                                                                     wiring):
    """retries=0: nothing is resubmitted by the client, the drain alone must keep every call. The
    rolling update starts a new worker (maxSurge), which is Ready once registered with the broker,
    before it stops an old one (maxUnavailable 0); the stopped worker says DRAINING, hands its
    unstarted tasks back to the broker, finishes the running ones and says BYE."""
    cp = k8s_node.control_plane
    core, apps, ns = cp.core(), cp.apps(), k8s_namespace
    values = {"worker": {"replicas": 2, "concurrency": 16, "threads": 16}}
    with installed(helm_bin, cp, ns, tmp_path, wiring, values) as release:
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 2, 90, "two Ready (registered) workers",
                 interval=0.5)
        old_pods = set(pods_left(core, ns, "worker"))
        remote = release.remote("tcp" if wiring.host_address else "k8s", retries=0)
        assert same_input(7, remote.invoke(7))
        callers = Callers(remote, CALLERS, same_input)
        callers.start()
        try:
            callers.wait_until_each_completed(3, 120)
            began = time.monotonic()
            upgrade = release.helm("upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values",
                                   "--set", f"worker.podAnnotations.rollout=r{int(time.time())}")
            assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
            wait_for(lambda: worker_rollout_done(apps, core, ns, 2, old_pods), 240, "the worker rollout to complete",
                     interval=0.5)
            done = time.monotonic()
            callers.wait_until_each_completed(MORE_CALLS, 120, since=done)
        finally:
            callers.stop()
        new_pods = set(pods_left(core, ns, "worker"))
        during = [c for c in callers.snapshot() if c.error is None and began <= c.ended <= done]
        served_by = {pod: sum(1 for c in during if c.out["pod"] == pod) for pod in sorted(old_pods | new_pods)}
        figures = {"calls": len(callers.snapshot()), "rollout seconds": round(done - began, 1),
                   "calls completed during the rollout": len(during),
                   "by Pod (old, then new)": {p: served_by[p] for p in [*sorted(old_pods), *sorted(new_pods)]}}
        print("\nhelm upgrade rolled the workers under load:", figures)
        assert [c.error for c in callers.errors] == [], f"{len(callers.errors)} calls failed: {figures}"
        assert callers.wrong == [], callers.wrong[:5]
        assert not new_pods & old_pods and len(new_pods) == 2, (old_pods, new_pods)
        # The load really spanned the rollout: old Pods served during it, and so did new ones.
        assert any(served_by[p] for p in old_pods) and any(served_by[p] for p in new_pods), served_by
        counters = release.counters()
        print("broker counters:", counters)
        assert counters["failed"] == 0 and counters["workers_lost"] == 0 and counters["retried"] == 0, counters
        assert counters["done"] == len(callers.snapshot()) + 1, counters  # each call once, and the first one
        # No container was restarted (a liveness probe failing a working worker would show here).
        pods = core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={RELEASE}").items
        restarts = [c.restart_count for p in pods for c in p.status.container_statuses or []]
        assert all(n == 0 for n in restarts), restarts


# ---------------------------------------------------------------------------- 3. autoscaler scale-down


def replica_history(apps, ns: str, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        value = apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas
        if not seen or seen[-1][1] != value:
            seen.append((time.monotonic(), value))
        time.sleep(0.2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("wiring", ["host-network"], indirect=True)
def test_the_autoscaler_scaling_the_workers_down_under_load_fails_no_call(helm_bin, k8s_node, k8s_namespace,
                                                                          tmp_path, wiring):
    """autoscaling.enabled, 4 calls in flight per worker aimed for: 12 callers ask for 3 workers;
    then 2 callers of longer calls (0.5-1.5 s, so that a removed worker is likely to have one
    running when it is told to stop) take over from them and keep calling while the autoscaler goes
    back to 1 worker after its 5 s window. The workers it removes drain (retries=0: nothing is
    resubmitted)."""
    cp = k8s_node.control_plane
    core, apps, ns = cp.core(), cp.apps(), k8s_namespace
    values = {
        "worker": {"concurrency": 4, "threads": 4},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetInFlightPerWorker": 4,
                        "targetTasksPerSlot": 1.0, "stabilizationWindowSeconds": 5, "scaleToZeroIdleSeconds": 600},
    }
    many, few = 12, 2
    with installed(helm_bin, cp, ns, tmp_path, wiring, values) as release:
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 1, 90, "one Ready (registered) worker", interval=0.5)
        remote = release.remote("tcp" if wiring.host_address else "k8s", retries=0)
        assert same_input(7, remote.invoke(7))
        seen: list[tuple[float, int]] = []
        stop_watch = threading.Event()
        watcher = threading.Thread(target=replica_history, args=(apps, ns, stop_watch, seen), daemon=True)
        watcher.start()
        busy = Callers(remote, many, same_input)
        steady = Callers(release.remote("tcp" if wiring.host_address else "k8s", retries=0, nap=(0.5, 1.5)),
                         few, same_input)
        busy.start()
        try:
            t0 = time.monotonic()
            wait_for(lambda: len(ready_pods(core, ns, "worker")) == 3, 180, "three Ready workers under load",
                     interval=0.5)
            release.timings["load -> 3 Ready workers"] = time.monotonic() - t0
            high = set(pods_left(core, ns, "worker"))
            busy.wait_until_each_completed(3, 60, since=time.monotonic())  # all three serve a while
            lowered = time.monotonic()
            steady.start()
            busy.stop()
            wait_for(lambda: apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 1, 120,
                     "the autoscaler to go back to 1 worker", interval=0.5)
            release.timings["load lowered -> replicas 1"] = time.monotonic() - lowered
            wait_for(lambda: len(pods_left(core, ns, "worker")) == 1, 120, "two worker Pods to drain and leave",
                     interval=0.5)
            left = time.monotonic()
            release.timings["load lowered -> one worker Pod left"] = left - lowered
            steady.wait_until_each_completed(MORE_CALLS, 90, since=left)
        finally:
            busy.stop()
            steady.stop()
            stop_watch.set()
            watcher.join(10)
        counts = [r for _, r in seen]
        scaled_down_at = next((t for t, r in seen if r == 1 and t > lowered), left)
        removed = high - set(pods_left(core, ns, "worker"))
        calls = busy.snapshot() + steady.snapshot()
        during = [c for c in steady.snapshot() if c.error is None and lowered <= c.ended <= left]
        drained = [c for c in during if c.out["pod"] in removed and c.ended > scaled_down_at]
        counters = release.counters()
        print(f"\nautoscaler scale-down under load: replicas went {counts}; {len(calls)} calls, "
              f"{len(during)} completed by the {few} remaining callers while 2 of the 3 worker Pods were removed, "
              f"{len(drained)} of them finished by a removed Pod after the scale-down; broker counters {counters}")
        errors = [c.error for c in calls if c.error is not None]
        assert errors == [], f"{len(errors)} calls failed: {errors[:3]}"
        assert busy.wrong == [] and steady.wrong == [], (busy.wrong[:5], steady.wrong[:5])
        assert 3 in counts and counts[-1] == 1 and counts.index(3) < len(counts) - 1, counts
        assert during, "no call completed while the workers were scaled down"
        assert counters["failed"] == 0 and counters["workers_lost"] == 0 and counters["retried"] == 0, counters
        assert counters["done"] == len(calls) + 1, counters  # each call once, and the first one
