"""What Prometheus's Kubernetes service discovery finds, for a Prometheus built without it.

Debian's ``prometheus`` package is built without ``kubernetes_sd_configs`` (its Kubernetes client
libraries are not packaged); upstream's build has it. :class:`TargetDiscovery` serves the same
targets, with the same ``__meta_kubernetes_*`` labels, read from the API server on every refresh,
as an ``http_sd_configs`` endpoint on 127.0.0.1, so the scrape configs (and their relabeling) are
the ones a cluster's Prometheus would run:

* :func:`pod_target_groups`: role ``pod`` (the annotation-driven scrape);
* :func:`endpoints_target_groups`: role ``endpoints`` (what the Prometheus Operator generates from
  a ServiceMonitor: :func:`service_monitor_scrape_config`).
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TargetDiscovery", "annotation_scrape_config", "endpoints_target_groups", "kubernetes_sd_available",
           "pod_target_groups", "service_monitor_scrape_config"]


def kubernetes_sd_available(folder: Path) -> bool:
    """Whether this Prometheus build has kubernetes_sd_configs."""
    probe = folder / "probe.yml"
    probe.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "probe", "kubernetes_sd_configs": [
        {"role": "pod", "kubeconfig_file": "/dev/null"}]}]}))
    checked = subprocess.run(["promtool", "check", "config", "--syntax-only", str(probe)], capture_output=True,
                             text=True, timeout=60)
    probe.unlink()
    return "kubernetes_sd_configs not found" not in checked.stdout + checked.stderr


def _sanitize(name: str) -> str:
    """A Kubernetes label or annotation name as kubernetes_sd writes it into a meta label."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _labels_of(prefix: str, labels: dict[str, str] | None, kind: str = "label") -> dict[str, str]:
    meta = {}
    for key, value in (labels or {}).items():
        meta[f"{prefix}_{kind}_{_sanitize(key)}"] = value
        meta[f"{prefix}_{kind}present_{_sanitize(key)}"] = "true"
    return meta


def _pod_meta(pod: Any) -> dict[str, str]:
    ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    return {"__meta_kubernetes_pod_name": pod.metadata.name, "__meta_kubernetes_pod_ip": pod.status.pod_ip or "",
            "__meta_kubernetes_pod_phase": pod.status.phase or "", "__meta_kubernetes_pod_ready": str(ready).lower(),
            **_labels_of("__meta_kubernetes_pod", pod.metadata.labels),
            **_labels_of("__meta_kubernetes_pod", pod.metadata.annotations, "annotation")}


def pod_target_groups(core: Any, namespace: str) -> list[dict[str, Any]]:
    """Role ``pod``: one target per declared container port (``__address__`` = Pod IP:port)."""
    groups = []
    for pod in core.list_namespaced_pod(namespace).items:
        if not pod.status.pod_ip:
            continue
        meta = {"__meta_kubernetes_namespace": namespace, **_pod_meta(pod)}
        for container in pod.spec.containers:
            for port in container.ports or []:
                groups.append({"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": {
                    **meta, "__meta_kubernetes_pod_container_name": container.name,
                    "__meta_kubernetes_pod_container_port_name": port.name or "",
                    "__meta_kubernetes_pod_container_port_number": str(port.container_port)}})
    return groups


def endpoints_target_groups(core: Any, namespace: str) -> list[dict[str, Any]]:
    """Role ``endpoints``: one target per address and port of every Endpoints object, with its
    Service's labels and, for an address backed by a Pod, the Pod's."""
    services = {s.metadata.name: s for s in core.list_namespaced_service(namespace).items}
    pods = {p.metadata.name: p for p in core.list_namespaced_pod(namespace).items}
    groups = []
    for endpoints in core.list_namespaced_endpoints(namespace).items:
        service = services.get(endpoints.metadata.name)
        meta = {"__meta_kubernetes_namespace": namespace,
                "__meta_kubernetes_endpoints_name": endpoints.metadata.name,
                **_labels_of("__meta_kubernetes_endpoints", endpoints.metadata.labels)}
        if service is not None:
            meta |= {"__meta_kubernetes_service_name": service.metadata.name,
                     **_labels_of("__meta_kubernetes_service", service.metadata.labels)}
        for subset in endpoints.subsets or []:
            for ready, addresses in (("true", subset.addresses), ("false", subset.not_ready_addresses)):
                for address in addresses or []:
                    pod = pods.get(address.target_ref.name) if address.target_ref is not None else None
                    for port in subset.ports or []:
                        labels = {**meta, "__meta_kubernetes_endpoint_ready": ready,
                                  "__meta_kubernetes_endpoint_port_name": port.name or "",
                                  "__meta_kubernetes_endpoint_port_protocol": port.protocol or "TCP",
                                  "__meta_kubernetes_endpoint_address_target_kind": "Pod" if pod else "",
                                  "__meta_kubernetes_endpoint_address_target_name": pod.metadata.name if pod else ""}
                        if pod is not None:
                            labels |= _pod_meta(pod)
                        groups.append({"targets": [f"{address.ip}:{port.port}"], "labels": labels})
    return groups


class TargetDiscovery:
    """An http_sd endpoint on 127.0.0.1 serving ``groups(core, namespace)``, read live on every refresh."""

    def __init__(self, groups: Callable[[Any, str], list[dict[str, Any]]], core: Any, namespace: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(groups(core, namespace)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/targets"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TargetDiscovery:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def service_monitor_scrape_config(monitor: dict[str, Any], kubeconfig: str,
                                  discovery: TargetDiscovery | None) -> dict[str, Any]:
    """The scrape config the Prometheus Operator generates from a ServiceMonitor with one endpoint
    (selector by matchLabels, a named port): role endpoints, the Service's labels kept, and the
    target labelled namespace/service/pod/container/endpoint, job = the Service's name. Through
    ``discovery`` when this Prometheus has no kubernetes_sd."""
    spec = monitor["spec"]
    [endpoint] = spec["endpoints"]
    namespaces = spec["namespaceSelector"]["matchNames"]
    if discovery is None:
        sd: dict[str, Any] = {"kubernetes_sd_configs": [{"role": "endpoints", "kubeconfig_file": kubeconfig,
                                                         "namespaces": {"names": namespaces}}]}
    else:
        sd = {"http_sd_configs": [{"url": discovery.url, "refresh_interval": "1s"}]}
    relabel: list[dict[str, Any]] = []
    for key, value in sorted(spec["selector"]["matchLabels"].items()):
        relabel.append({"action": "keep", "source_labels": [f"__meta_kubernetes_service_label_{_sanitize(key)}",
                                                            f"__meta_kubernetes_service_labelpresent_{_sanitize(key)}"],
                        "regex": f"({value});true"})
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                           "__meta_kubernetes_endpoint_address_target_name"],
         "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    name = monitor["metadata"]
    return {"job_name": f"serviceMonitor/{name['namespace']}/{name['name']}/0",
            "scrape_interval": endpoint.get("interval", "30s"), "metrics_path": endpoint.get("path", "/metrics"),
            "honor_labels": False, **sd, "relabel_configs": relabel}


ANNOTATION_RELABEL = [  # the usual annotation-driven Pod scrape: prometheus.io/scrape, /path, /port
    {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "action": "keep", "regex": "true"},
    {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"], "action": "replace",
     "target_label": "__metrics_path__", "regex": "(.+)"},
    {"source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"], "action": "replace",
     "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]


def annotation_scrape_config(job: str, namespace: str, kubeconfig: str,
                             discovery: TargetDiscovery | None) -> dict[str, Any]:
    """The annotation-driven Pod scrape most Prometheus setups run (``prometheus.io/scrape``,
    ``/path``, ``/port``; targets labelled ``namespace`` and ``pod``): kubernetes_sd role pod when
    this Prometheus has it, else the same targets through ``discovery`` (:func:`pod_target_groups`)."""
    if discovery is None:
        sd: dict[str, Any] = {"kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": kubeconfig,
                                                         "namespaces": {"names": [namespace]}}]}
    else:
        sd = {"http_sd_configs": [{"url": discovery.url, "refresh_interval": "1s"}]}
    return {"job_name": job, "scrape_interval": "1s", **sd, "relabel_configs": ANNOTATION_RELABEL}
