"""What the autoscaler moves, and ``scale()`` for doing it by hand (docs/design.md#scaling-and-losing-peers).

    from pool.scaling import scale
    scale("k8s://team-a/my-pool", 3)   # the release's worker Deployment, via its scale subresource
    scale(local_pool, 3)               # a LocalPool's worker processes (they drain when removed)

Scaling down loses no task: a removed worker stops taking tasks and finishes what it has.
"""

from __future__ import annotations

from typing import Any, Protocol


class Scaler(Protocol):
    """Something whose worker count can be read and set: a LocalPool's processes
    (``pool.local.LocalPoolScaler``) or a Deployment (``pool.k8s.deployment.DeploymentScaler``)."""

    def current(self) -> int: ...
    def scale(self, replicas: int) -> None: ...
    def describe(self) -> str: ...


class ScalablePool(Protocol):
    def scale(self, workers: int, wait: bool = True) -> None: ...


def scale(target: ScalablePool | str, replicas: int, *, kubeconfig: Any = None) -> None:
    """Set the worker count of a pool: a ``LocalPool`` (or anything with its ``scale``), or
    ``"k8s://NAMESPACE/RELEASE"`` (the release's worker Deployment)."""
    if replicas < 0:
        raise ValueError("replicas must be 0 or more")
    if isinstance(target, str):
        from pool.k8s.address import parse_k8s_address
        from pool.k8s.deployment import scale_deployment

        try:
            namespace, release = parse_k8s_address(target)
        except ValueError as exc:
            raise ValueError(f"expected k8s://NAMESPACE/RELEASE or a LocalPool, got {target!r}") from exc
        scale_deployment(replicas, namespace=namespace, release=release, kubeconfig=kubeconfig)
    else:
        target.scale(replicas, wait=False)
