"""Every metric the broker exports is in the metrics tables of the docs, and every metric those
tables name is exported: an operator reads the table, a dashboard queries the names, and neither
may drift from the broker.

The broker runs in this process with every optional series on (its builtin autoscaler after a
change, a memory limit), and is scraped over its real HTTP endpoint."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings, Load
from tests.support.paths import REPO
from tests.support.scale_stand_in import Deployment

TABLES = [REPO / "docs/operations.md", REPO / "charts/worker-pool/README.md"]


@pytest.fixture(scope="module")
def exported() -> Iterator[set[str]]:
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    autoscaler = Autoscaler(AutoscaleSettings(), Deployment(0), resync=0)
    autoscaler.step(Load(queued=1, running=0, slots_per_worker=4))
    metrics = BrokerMetrics(broker, memory_limit=2**30, autoscaler=autoscaler).attach()
    try:
        port = metrics.serve(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.close()
        broker.close()
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("runnable_k8s_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    yield names


def documented(path: Path) -> set[str]:
    """The runnable_k8s_* names in the first column of the file's tables."""
    return set(re.findall(r"^\| `(runnable_k8s_\w+)`", path.read_text(encoding="utf-8"), flags=re.MULTILINE))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", TABLES, ids=[str(p.relative_to(REPO)) for p in TABLES])
def test_every_exported_metric_is_documented_and_every_documented_one_exported(exported: set[str],
                                                                               path: Path) -> None:
    names = documented(path)
    assert len(exported) > 30, exported  # the scrape saw the broker's series, not an empty page
    assert exported - names == set(), f"exported but not in the table of {path.name}"
    assert names - exported == set(), f"in the table of {path.name} but not exported"
