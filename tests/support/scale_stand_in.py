"""A stand-in for a worker Deployment's scale subresource (the Kubernetes API, not our code), for
tests that run the builtin autoscaler without a cluster."""

from __future__ import annotations


class Deployment:
    """Replicas that change when the autoscaler scales them (``pool.scaling.target.Scaler``)."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def current(self) -> int:
        return self.replicas

    def scale(self, replicas: int) -> None:
        self.replicas = replicas

    def describe(self) -> str:
        return "deployment/stand-in"
