"""`runnable-k8s gc`: which leftover runner Pods it deletes, as a pure function over Pod-like
objects (no cluster), which Pods it lists (the label selectors, applied here as the API server
applies them, to this release's runner Pods and to older releases'), and the flags that choose it."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from pool.cli import build_parser
from pool.ephemeral.k8s_launcher import delete_leftover_runners, owner_alive_here, select_leftover_runners
from pool.ephemeral.podspec import (
    KEEP_LABEL,
    LEGACY_ROLE_LABEL,
    LEGACY_RUNNER_SELECTOR,
    OWNER_LABEL,
    ROLE_LABEL,
    RUNNER_ROLE,
    RUNNER_SELECTOR,
    parse_owner,
    runner_pod,
)
from tests.cluster import cluster
from tests.support.helm import CHART, helm, values_file
from worker import defaults

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
HERE = "laptop"
LIVE_PIDS = {100}


def pod(name: str, age: float, *, owner: str | None = "other-7-abcd1234", deadline: int | None = 600,
        keep: bool = False) -> Any:
    labels = {"app.kubernetes.io/managed-by": "runnable-k8s"}
    if owner is not None:
        labels[OWNER_LABEL] = owner
    if keep:
        labels[KEEP_LABEL] = "true"
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels=labels, creation_timestamp=NOW - dt.timedelta(seconds=age)),
        spec=SimpleNamespace(active_deadline_seconds=deadline))


def chosen(pods: list[Any], **options: Any) -> set[str]:
    options.setdefault("older_than", 0)
    decisions = select_leftover_runners(pods, now=NOW, this_host=HERE, alive=LIVE_PIDS.__contains__, **options)
    assert len(decisions) == len(pods) and all(d.why for d in decisions)
    return {d.name for d in decisions if d.delete}


PAST = 600 + defaults.GC_DEADLINE_MARGIN + 1  # older than a 600 s deadline and its margin


def test_by_default_only_pods_past_their_own_deadline_whose_owner_is_gone():
    pods = [
        pod("running-call", 30),
        pod("inside-margin", 600 + defaults.GC_DEADLINE_MARGIN - 1),
        pod("past-deadline", PAST),
        pod("long-timeout-call", PAST, deadline=7200),  # its call may still run: its own deadline counts
        pod("owner-alive-here", PAST, owner=f"{HERE}-100-abcd1234"),
        pod("owner-dead-here", PAST, owner=f"{HERE}-200-abcd1234"),
        pod("same-pid-other-host", PAST, owner="elsewhere-100-abcd1234"),
        pod("no-owner-label", PAST, owner=None),  # made by an older version
        pod("no-deadline", defaults.EPHEMERAL_ACTIVE_DEADLINE + defaults.GC_DEADLINE_MARGIN + 1, deadline=None),
    ]
    assert chosen(pods) == {"past-deadline", "owner-dead-here", "same-pid-other-host", "no-owner-label",
                            "no-deadline"}


def test_older_than_is_a_floor_in_every_mode():
    pods = [pod("past-deadline", PAST), pod("ancient", 10 * PAST)]
    assert chosen(pods, older_than=2 * PAST) == {"ancient"}
    assert chosen(pods, older_than=2 * PAST, all_owners=True) == {"ancient"}
    assert chosen(pods, older_than=2 * PAST, owner="other-7-abcd1234") == {"ancient"}


def test_owner_takes_that_owners_pods_whatever_their_deadline():
    mine, theirs = f"{HERE}-100-abcd1234", "other-7-abcd1234"
    pods = [pod("mine-young", 5, owner=mine), pod("mine-old", PAST, owner=mine),
            pod("theirs-old", PAST, owner=theirs), pod("unlabelled", PAST, owner=None)]
    # Even a live owner: naming it says it is gone (or that you want its Pods gone).
    assert chosen(pods, owner=mine) == {"mine-young", "mine-old"}
    assert chosen(pods, owner=theirs) == {"theirs-old"}


def test_all_owners_widens_to_every_pod_older_than_the_floor():
    pods = [pod("young", 5), pod("owner-alive-here", 60, owner=f"{HERE}-100-abcd1234"),
            pod("long-timeout", 60, deadline=7200), pod("unlabelled", 60, owner=None)]
    assert chosen(pods, older_than=30, all_owners=True) == {"owner-alive-here", "long-timeout", "unlabelled"}


@pytest.mark.parametrize("options", [{}, {"all_owners": True}, {"owner": "other-7-abcd1234"}])
def test_a_pod_kept_on_purpose_is_never_deleted(options):
    assert chosen([pod("kept", 100 * PAST, keep=True)], **options) == set()


def test_pods_without_a_name_or_creation_time_are_skipped():
    broken = SimpleNamespace(metadata=SimpleNamespace(name=None, labels={}, creation_timestamp=NOW), spec=None)
    assert select_leftover_runners([broken], now=NOW, older_than=0) == []


def test_a_real_manifests_labels_are_what_gc_reads():
    manifest = runner_pod(image="i", namespace="n", active_deadline_seconds=600)
    labels = manifest["metadata"]["labels"]
    obj = pod("real", PAST, owner=labels[OWNER_LABEL], deadline=manifest["spec"]["activeDeadlineSeconds"])
    host, _ = parse_owner(labels[OWNER_LABEL]) or ("", 0)
    # Our own process runs on this host: the default leaves its Pods to it.
    assert owner_alive_here(labels[OWNER_LABEL], host, lambda pid: True)
    decision, = select_leftover_runners([obj], now=NOW, older_than=0, this_host=host, alive=lambda pid: True)
    assert decision.delete is False
    kept = runner_pod(image="i", namespace="n", keep=True)["metadata"]["labels"]
    assert chosen([pod("kept", 100 * PAST, owner=kept[OWNER_LABEL], keep=kept.get(KEEP_LABEL) == "true")]) == set()


def test_the_default_floor_is_above_the_longest_default_deadline():
    assert defaults.GC_OLDER_THAN > defaults.EPHEMERAL_ACTIVE_DEADLINE + defaults.GC_DEADLINE_MARGIN
    assert defaults.GC_DEADLINE_MARGIN > defaults.EPHEMERAL_START_TIMEOUT  # the deadline starts once scheduled


class FakeCore:
    """The two CoreV1Api calls gc makes, over a list of Pods: the list applies its label selector as
    the API server does (equality terms), so a Pod gc's selectors miss is not listed."""

    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods
        self.deleted: list[str] = []
        self.selectors: list[str] = []

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        self.selectors.append(label_selector)
        return SimpleNamespace(items=[p for p in self.pods if _matches(label_selector, p.metadata.labels or {})])

    def delete_namespaced_pod(self, name: str, namespace: str, grace_period_seconds: int) -> None:
        self.deleted.append(name)


def listed_runner(name: str, age_s: float, *, legacy: bool = False, owner: str = "gone-1-x") -> Any:
    """A runner Pod as the API returns it: this release's labels, or (``legacy``) an older
    release's, whose role key was runnable-k8s/role."""
    labels = {"app.kubernetes.io/managed-by": "runnable-k8s", OWNER_LABEL: owner,
              (LEGACY_ROLE_LABEL if legacy else ROLE_LABEL): RUNNER_ROLE}
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=labels, creation_timestamp=dt.datetime.now(
        dt.timezone.utc) - dt.timedelta(seconds=age_s)), spec=SimpleNamespace(active_deadline_seconds=60))


def test_delete_leftover_runners_deletes_what_was_chosen_and_dry_run_nothing():
    core = FakeCore([listed_runner("old", 5 * 3600), listed_runner("young", 0)])
    assert delete_leftover_runners(core, "ns", dry_run=True) == ["old"] and core.deleted == []  # type: ignore[arg-type]
    assert delete_leftover_runners(core, "ns") == ["old"] and core.deleted == ["old"]  # type: ignore[arg-type]
    assert all("managed-by=runnable-k8s" in selector for selector in core.selectors)


def test_gc_finds_the_runner_pods_of_older_releases_and_nothing_else():
    # Runner Pods made before the role key moved under runnable-k8s.io/ carry runnable-k8s/role:
    # gc lists them too (a second selector), each Pod once, and still no Pod without a role.
    chart_pod = SimpleNamespace(metadata=SimpleNamespace(
        name="chart-worker", labels={"app.kubernetes.io/managed-by": "runnable-k8s", OWNER_LABEL: "gone-1-x"},
        creation_timestamp=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=5)), spec=None)
    both = listed_runner("both-labels", 5 * 3600)
    both.metadata.labels[LEGACY_ROLE_LABEL] = RUNNER_ROLE
    old_release = listed_runner("old-release", 5 * 3600, legacy=True)
    core = FakeCore([listed_runner("new", 5 * 3600), old_release, both, chart_pod])
    assert sorted(delete_leftover_runners(core, "ns")) == ["both-labels", "new", "old-release"]  # type: ignore[arg-type]
    assert sorted(core.deleted) == ["both-labels", "new", "old-release"]
    assert sorted(core.selectors) == sorted([RUNNER_SELECTOR, LEGACY_RUNNER_SELECTOR])
    assert not _matches(RUNNER_SELECTOR, listed_runner("x", 0, legacy=True).metadata.labels)  # the check can say no


def test_the_gc_flags():
    parser = build_parser()
    args = parser.parse_args(["gc"])
    assert args.owner is None and args.all_owners is False and args.older_than == defaults.GC_OLDER_THAN
    assert parser.parse_args(["gc", "--owner", "h-1-x"]).owner == "h-1-x"
    assert parser.parse_args(["gc", "--all-owners", "--dry-run"]).all_owners is True
    with pytest.raises(SystemExit):
        parser.parse_args(["gc", "--owner", "h-1-x", "--all-owners"])


def _matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether ``labels`` satisfy an equality-based label selector (``a=b,c=d``), as the API server
    applies it to list_namespaced_pod."""
    return all(labels.get(key) == value for key, value in (term.split("=", 1) for term in selector.split(",")))


@pytest.mark.timeout(30)
def test_the_gc_help_says_exactly_which_pods_it_deletes():
    result = subprocess.run([sys.executable, "-m", "pool", "gc", "--help"], capture_output=True, text=True,
                            timeout=20, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert f"carry the labels {RUNNER_SELECTOR}" in text  # the selector it lists Pods with, verbatim
    assert "--namespace (default 'default'; the kubeconfig's current namespace is not used)" in text
    assert "The worker pool's Pods" in text and "never deleted" in text
    assert f"at least --older-than seconds old (default {defaults.GC_OLDER_THAN:g})" in text
    assert f"plus {defaults.GC_DEADLINE_MARGIN:g} s" in text and str(defaults.EPHEMERAL_ACTIVE_DEADLINE) in text
    assert OWNER_LABEL in text and f"{KEEP_LABEL}=true" in text


def test_the_selector_gc_lists_with_takes_runner_pods_and_nothing_the_chart_makes(tmp_path):
    helm_bin = cluster.BIN / "helm"
    if not os.access(helm_bin, os.X_OK):
        pytest.skip(f"helm CLI not built ({helm_bin}); run: bash tests/cluster/build.sh binaries")
    runner = runner_pod(image="i", namespace="n")["metadata"]["labels"]
    assert _matches(RUNNER_SELECTOR, runner)  # the check itself can say yes
    for values in ({}, {"curve": {"enabled": False, "insecureAcknowledged": True}, "autoscaling": {"enabled": True},
                        "commonLabels": {"app.kubernetes.io/name": "runnable-k8s"}}):
        args = ["template", "rel", str(CHART), "-n", "team-a", "-f", values_file(tmp_path, values)]
        result = helm(str(helm_bin), *args, tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
        pod_labels += [d["metadata"]["labels"] for d in docs if d["kind"] == "Pod"]  # the helm test Pod
        assert len(pod_labels) >= 3
        for labels in pod_labels:
            for selector in (RUNNER_SELECTOR, LEGACY_RUNNER_SELECTOR):
                assert not _matches(selector, labels), (selector, labels)
