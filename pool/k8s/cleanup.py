"""``runnable-k8s gc`` against the API: the leftover runner Pods of ephemeral mode.

Which Pods are leftovers is decided by :func:`pool.ephemeral.gc.delete_leftover_runners`;
this module builds its API client and turns every refusal (no kubeconfig, RBAC, an unreachable
server) into one RunnableK8sError line, so the command line shows a fix rather than a traceback.
"""

from __future__ import annotations

from pool.errors import RunnableK8sError


def delete_leftover_runner_pods(namespace: str, older_than: float, *, owner: str | None = None,
                                all_owners: bool = False, dry_run: bool = False,
                                kubeconfig: str | None = None) -> list[str]:
    """Names of the runner Pods deleted (or, with ``dry_run``, that would be)."""
    from kubernetes.client.rest import ApiException

    from pool.ephemeral.gc import delete_leftover_runners
    from pool.k8s.api import api_error
    from pool.k8s.core import core_api

    core = core_api(kubeconfig)
    try:
        return delete_leftover_runners(core, namespace, older_than, owner=owner, all_owners=all_owners,
                                       dry_run=dry_run)
    except ApiException as exc:
        raise api_error(exc, "list or delete", "pods", namespace, error=RunnableK8sError) from exc
    except OSError as exc:
        raise RunnableK8sError(f"could not reach the Kubernetes API to list Pods in namespace {namespace!r}: {exc}. "
                               "Check the kubeconfig's server and that `kubectl get pods` works") from exc
