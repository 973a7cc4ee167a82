"""``runnable-k8s gc``: which leftover runner Pods to delete, and deleting them.

gc runs in another process than the clients that made the Pods, so it judges each Pod by its
labels (owner, keep), its age and its own deadline (:func:`select_leftover_runners`, a pure
function, tested without a cluster); the API calls are ``pool.k8s.runner_pods``'s.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pool.ephemeral.podspec import KEEP_LABEL, OWNER_LABEL, host_label, parse_owner
from pool.k8s import runner_pods
from worker import defaults

log = logging.getLogger("runnable_k8s.ephemeral")

__all__ = ["GcDecision", "delete_leftover_runners", "owner_alive_here", "pid_alive", "select_leftover_runners"]

@dataclass(frozen=True)
class GcDecision:
    name: str
    delete: bool
    why: str


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    except OSError:
        return False
    return True


def owner_alive_here(owner: str | None, this_host: str, alive: Callable[[int], bool]) -> bool:
    """True when ``owner`` names a process of this host that still runs (pid reuse can make a dead
    owner look alive: then gc keeps the Pod, the safe mistake)."""
    parsed = parse_owner(owner) if owner else None
    return parsed is not None and bool(parsed[0]) and parsed[0] == this_host and alive(parsed[1])


def select_leftover_runners(
    pods: Iterable[Any],
    *,
    now: dt.datetime,
    older_than: float = defaults.GC_OLDER_THAN,
    owner: str | None = None,
    all_owners: bool = False,
    this_host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> list[GcDecision]:
    """Which runner Pods `runnable-k8s gc` deletes, and why (a pure function of the Pods, the
    time and the process table, so that it can be tested without a cluster).

    gc runs in another process than the clients that made the Pods, so "leftover" means:

    * never a Pod labelled ``runnable-k8s.io/keep: "true"`` (kept on purpose with
      ``k8s_delete_runner_pod=False``; delete it with kubectl);
    * by default, a Pod whose owner is gone: older than ``older_than`` *and* than its own
      activeDeadlineSeconds + GC_DEADLINE_MARGIN (Kubernetes has stopped it by then, so no call
      can still use it), and whose owner label does not name a process that still runs on this
      host. Pods of owners on other hosts are judged by age alone: their process table is not ours;
    * with ``owner``, that owner's Pods older than ``older_than`` whatever their deadline (you say
      that process is gone; pass ``older_than=0`` to take them all at once);
    * with ``all_owners``, every owner's Pods older than ``older_than``, whatever their deadline
      and whether their owner runs (this can stop a running call whose timeout is longer).
    """
    host = host_label() if this_host is None else this_host
    decisions = []
    for pod in pods:
        meta = pod.metadata
        if meta is None or meta.name is None or meta.creation_timestamp is None:
            continue  # the API always sets both; nothing to age or delete without them
        labels = meta.labels or {}
        age = (now - meta.creation_timestamp).total_seconds()
        pod_owner = labels.get(OWNER_LABEL)
        if labels.get(KEEP_LABEL) == "true":
            decisions.append(GcDecision(meta.name, False, "kept on purpose (k8s_delete_runner_pod=False)"))
            continue
        if age < older_than:
            decisions.append(GcDecision(meta.name, False, f"younger than {older_than:g}s"))
            continue
        if owner is not None:
            if pod_owner == owner:
                decisions.append(GcDecision(meta.name, True, f"owner {owner}, older than {older_than:g}s"))
            else:
                decisions.append(GcDecision(meta.name, False, f"owner {pod_owner or 'unknown'}, not {owner}"))
            continue
        if all_owners:
            decisions.append(GcDecision(meta.name, True, f"older than {older_than:g}s (--all-owners)"))
            continue
        spec = getattr(pod, "spec", None)
        deadline = getattr(spec, "active_deadline_seconds", None)
        if deadline is None:
            deadline = defaults.EPHEMERAL_ACTIVE_DEADLINE
        limit = deadline + defaults.GC_DEADLINE_MARGIN
        if age < limit:
            decisions.append(GcDecision(meta.name, False, f"within its deadline ({deadline}s + margin)"))
        elif owner_alive_here(pod_owner, host, alive):
            decisions.append(GcDecision(meta.name, False, f"its owner {pod_owner} still runs on this host"))
        else:
            decisions.append(GcDecision(meta.name, True, f"past its deadline ({deadline}s + margin), "
                                                         f"owner {pod_owner or 'unknown'} gone"))
    return decisions


def delete_leftover_runners(
    core: Any,
    namespace: str,
    older_than: float = defaults.GC_OLDER_THAN,
    *,
    owner: str | None = None,
    all_owners: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Delete this project's leftover runner Pods (``runnable-k8s gc``); returns their names.

    Only Pods of ``namespace`` matching ``RUNNER_SELECTOR`` (app.kubernetes.io/managed-by=runnable-k8s,
    runnable-k8s.io/role=ephemeral-runner: the labels of ephemeral mode's runner Pods, which the
    chart's broker and worker Pods never carry) or ``LEGACY_RUNNER_SELECTOR`` (the same with the
    role key of older releases, runnable-k8s/role, so that their leftovers are found too) are
    listed; :func:`select_leftover_runners` says which of them go. Each is deleted with a grace
    period of 0. A refusal of the API raises the client's ``ApiException``."""
    pods = runner_pods.list_runner_pods(core, namespace)
    deleted: list[str] = []
    for decision in select_leftover_runners(pods, now=dt.datetime.now(dt.timezone.utc), older_than=older_than,
                                            owner=owner, all_owners=all_owners):
        log.debug("gc %s/%s: %s (%s)", namespace, decision.name, "delete" if decision.delete else "keep",
                  decision.why)
        if not decision.delete:
            continue
        if dry_run:
            deleted.append(decision.name)
            continue
        if runner_pods.delete(core, namespace, decision.name):
            deleted.append(decision.name)
    return deleted
