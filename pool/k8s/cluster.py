"""What a bench run on Kubernetes records about the cluster it ran on (server version, nodes,
container runtime), so that figures from two clusters are never compared unknowingly."""

from __future__ import annotations

from typing import Any


def cluster_info(kubeconfig: str | None) -> dict[str, Any]:
    """The server's version, the node count and the first node's runtime and kubelet; on any
    failure ``{"error": ...}`` instead, since the block is informative only."""
    try:
        from kubernetes import client

        from pool.k8s.api import api_client

        api = api_client(kubeconfig)
        version = client.VersionApi(api).get_code()
        nodes = client.CoreV1Api(api).list_node().items
        info = nodes[0].status.node_info if nodes and nodes[0].status else None
        return {"server_version": version.git_version, "nodes": len(nodes),
                "container_runtime": info.container_runtime_version if info else None,
                "kubelet": info.kubelet_version if info else None}
    except Exception as exc:  # noqa: BLE001 - the environment block is informative only
        return {"error": f"{type(exc).__name__}: {exc}"}
