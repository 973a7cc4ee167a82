"""The chart's dashboard and alerts as a Prometheus test reads them: the chart rendered by helm, one
object of a kind picked out, each dashboard panel's query with Grafana's variables filled in, each
alert's signal split from its threshold. Shared by the test against a local broker
(tests/test_prometheus_queries.py) and the one against the chart on the test cluster
(tests/test_prometheus_cluster.py), so both prove the same queries the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.support.helm import CHART, helm, values_file

__all__ = ["RATE_INTERVAL", "THRESHOLD", "alert_rules", "alert_signal", "grafana", "only", "panel_queries",
           "render"]

RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s scrape: four scrapes
# An alert expression is "<signal> <comparison> <number>"; the signal must return data under load.
THRESHOLD = re.compile(r"^(?P<signal>.+?)\s*(?P<op>>|<|==|>=|<=|!=)\s*(?P<threshold>[0-9.]+)$", re.S)


def render(helm_bin: str, folder: Path, release: str, namespace: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """`helm template` of the chart with ``values``: its objects, as the cluster would get them."""
    result = helm(helm_bin, "template", release, str(CHART), "-n", namespace, "-f", values_file(folder, values),
                  tmp_path=folder)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of ``kind`` among ``docs`` (fails, listing what there is, unless exactly one)."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def grafana(expr: str, job: str, namespace: str, rate_interval: str = RATE_INTERVAL) -> str:
    """A panel's expression as Grafana sends it, its variables filled in."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace)
            .replace("$job", job))


def panel_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's expression, as written in the dashboard (variables not filled in)."""
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of a rule file's ``groups``."""
    return [r for group in rules["groups"] for r in group["rules"] if "alert" in r]


def alert_signal(alert: dict[str, Any]) -> str:
    """The signal of an alert written ``<signal> <op> <number>`` (fails naming the alert otherwise)."""
    match = THRESHOLD.match(alert["expr"])
    assert match, f"{alert['alert']}: not <signal> <op> <number>: {alert['expr']}"
    return match["signal"]
