"""The test cluster's external metrics adapter (tests/cluster/metrics-adapter), run on this host
and registered with the API server, so a HorizontalPodAutoscaler on an External metric works.

    with ExternalMetricsAdapter(cp, namespace, folder, rules, prometheus.url) as adapter:
        adapter.values("runnable_k8s_scaling_demand", "service=pool-worker-pool-broker")

What an operator installs as prometheus-adapter (a Deployment behind a Service, an APIService
``v1beta1.external.metrics.k8s.io`` naming that Service) is here a process listening on the pod
bridge's host address, a selector-less Service whose Endpoints name that address, and the same
APIService. The API server's aggregation layer (front-proxy certificates, set up by
tests/cluster/cluster.py) then proxies the HPA controller's reads to it, authenticated and
authorized as they would be in a cluster. On exit the APIService goes first (a registered group
whose server is gone breaks discovery for every client), then the process and the Service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.cluster import BIN, POD_GATEWAY
from tests.support.processes import Started, fail_if_exited, stop_process
from tests.support.waiting import wait_for

__all__ = ["ADAPTER_BINARY", "API_SERVICE", "ExternalMetricsAdapter"]

ADAPTER_BINARY = BIN / "external-metrics-adapter"
API_SERVICE = "v1beta1.external.metrics.k8s.io"
SERVICE = "external-metrics-adapter"


def _free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class ExternalMetricsAdapter(Started):
    """The adapter serving ``rules`` (prometheus-adapter's ``externalRules`` format) from the
    Prometheus at ``prometheus_url``, registered for the whole cluster while the block runs."""

    def __init__(self, cp: Any, namespace: str, folder: Path, rules: dict[str, Any], prometheus_url: str) -> None:
        if not os.access(ADAPTER_BINARY, os.X_OK):
            raise RuntimeError(f"{ADAPTER_BINARY} is not built: bash tests/cluster/build-binaries.sh adapter")
        self.cp, self.namespace, self.folder = cp, namespace, folder
        self.rules, self.prometheus_url = rules, prometheus_url
        self.log = folder / "external-metrics-adapter.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.registered = False

    @staticmethod
    def _unregistered(registration: Any) -> bool:
        from kubernetes.client.rest import ApiException

        try:
            registration.read_api_service(API_SERVICE)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def start(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        config = self.folder / "adapter-rules.yaml"
        config.write_text(yaml.safe_dump(self.rules))
        port = _free_port_on(POD_GATEWAY)
        kubeconfig = self.cp.kubeconfig
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(ADAPTER_BINARY), f"--config={config}", f"--prometheus-url={self.prometheus_url}",
                 f"--bind-address={POD_GATEWAY}", f"--secure-port={port}",
                 f"--cert-dir={self.folder / 'adapter-certs'}",
                 f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}", "--v=2"],
                stdout=log, stderr=subprocess.STDOUT)
        core = self.cp.core()
        core.create_namespaced_service(self.namespace, client.V1Service(
            metadata=client.V1ObjectMeta(name=SERVICE),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="https", port=443, target_port=port)])))
        core.create_namespaced_endpoints(self.namespace, client.V1Endpoints(
            metadata=client.V1ObjectMeta(name=SERVICE),
            subsets=[client.V1EndpointSubset(addresses=[client.V1EndpointAddress(ip=POD_GATEWAY)],
                                             ports=[client.CoreV1EndpointPort(name="https", port=port)])]))
        registration = client.ApiregistrationV1Api(self.cp.api_client)
        self.registered = True  # from here on, close() unregisters whatever happens
        with contextlib.suppress(ApiException):  # one left by a run that was killed
            registration.delete_api_service(API_SERVICE)
        wait_for(lambda: self._unregistered(registration), 30, f"a stale {API_SERVICE} to be unregistered")
        registration.create_api_service(client.V1APIService(
            metadata=client.V1ObjectMeta(name=API_SERVICE),
            spec=client.V1APIServiceSpec(
                group="external.metrics.k8s.io", version="v1beta1", group_priority_minimum=100, version_priority=100,
                insecure_skip_tls_verify=True,
                service=client.ApiregistrationV1ServiceReference(name=SERVICE, namespace=self.namespace, port=443))))

        def available() -> bool:
            fail_if_exited(self.proc, "the adapter", self.log)
            status = registration.read_api_service(API_SERVICE).status
            return any(c.type == "Available" and c.status == "True" for c in (status.conditions or []))

        try:
            wait_for(available, 60, f"the API server to find {API_SERVICE} available")
        except AssertionError as exc:
            conditions = registration.read_api_service(API_SERVICE).status.conditions or []
            raise AssertionError(f"{exc}: {[(c.type, c.status, c.reason, c.message) for c in conditions]}; "
                                 f"the adapter's log ends: {self.log.read_text()[-3000:]}") from None

    def values(self, metric: str, label_selector: str = "") -> list[dict[str, Any]]:
        """The metric's items as the HPA controller reads them, through the API server."""
        from kubernetes import client

        # The external metrics API lists a metric as a namespaced collection named by it.
        body = client.CustomObjectsApi(self.cp.api_client).list_namespaced_custom_object(
            "external.metrics.k8s.io", "v1beta1", self.namespace, metric, label_selector=label_selector)
        return list(body.get("items", []))

    def close(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if self.registered:
            registration = client.ApiregistrationV1Api(self.cp.api_client)
            with contextlib.suppress(ApiException):
                registration.delete_api_service(API_SERVICE)
            wait_for(lambda: self._unregistered(registration), 30, f"{API_SERVICE} to be unregistered")
            self.registered = False
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        core = self.cp.core()
        with contextlib.suppress(ApiException):
            core.delete_namespaced_service(SERVICE, self.namespace)
        with contextlib.suppress(ApiException):
            core.delete_namespaced_endpoints(SERVICE, self.namespace)
