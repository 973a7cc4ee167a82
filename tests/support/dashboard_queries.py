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
from tests.support.prometheus import PrometheusServer
from tests.support.waiting import wait_for

__all__ = ["NO_READY_WORKERS", "RATE_INTERVAL", "THRESHOLD", "alert_rules", "alert_signal", "check_alert_signals",
           "grafana", "only", "panel_queries", "render"]

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


NO_READY_WORKERS = "RunnableK8sNoReadyWorkers"


def check_alert_signals(prom: PrometheusServer, alerts: list[dict[str, Any]]) -> None:
    """Under load, with workers: every alert expression parses, every alert's signal returns data
    (but the no-ready-workers one, which has data only with no worker), and that alert stays silent."""
    for alert in alerts:
        prom.query(alert["expr"])  # parses (an error raises)
        if alert["alert"] == NO_READY_WORKERS:
            continue
        signal = alert_signal(alert)
        wait_for(lambda s=signal: prom.query(s), 30, f"data for {alert['alert']}'s signal {signal}")
    assert not prom.query(f'ALERTS{{alertname="{NO_READY_WORKERS}"}}')
