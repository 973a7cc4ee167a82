"""Where things are: the repository root (the tests run from it, and workers import test modules
from it) and the Helm chart."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "worker-pool"
