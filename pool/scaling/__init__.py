"""Scaling the workers (docs/design.md#scaling-and-losing-peers): the policy (``policy``, plain
functions over plain numbers), the autoscaler that applies it (``autoscaler``), and what it moves
(``target``: a LocalPool's processes or a Deployment's replicas)."""

from pool.scaling.target import Scaler, scale

__all__ = ["Scaler", "scale"]
