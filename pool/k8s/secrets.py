"""The CurveZMQ key tree as Kubernetes Secrets (``runnable-k8s keys DIR --k8s-secret PREFIX``).

The manifests come from :func:`pool.keys.key_secret_manifests` (one Secret per role, so that no Pod
is given a secret that is not its own); this module only writes them. It lives here, with the
other Kubernetes API code, so that the command line itself never talks to the API, and every
refusal reaches the user as one :class:`~pool.errors.RunnableK8sError` line that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool.errors import RunnableK8sError
from pool.k8s.core import core_api


def write_key_secrets(directory: str | Path, prefix: str, namespace: str, *, revoked: list[str] | None = None,
                      kubeconfig: str | None = None, say: Callable[[str], None] = print) -> None:
    """Create the Secrets of the key tree in ``directory``; on a re-run replace the two allow-lists
    (clients added or revoked), keep the key pairs, and delete the Secrets of ``revoked`` clients.
    ``say`` hears one line per Secret. Raises RunnableK8sError on a refusal."""
    from kubernetes.client.rest import ApiException

    from pool.k8s.api import api_error
    from pool.keys import is_allow_list, key_secret_manifests

    core = core_api(kubeconfig)
    try:
        manifest: Any  # the client takes a dict as a V1Secret
        for manifest in key_secret_manifests(directory, prefix):
            name = manifest["metadata"]["name"]
            try:
                core.create_namespaced_secret(namespace, manifest)
                say(f"  created Secret {namespace}/{name}")
            except ApiException as exc:
                if exc.status != 409:
                    raise
                if is_allow_list(manifest):  # an allow-list follows the folder: clients added or revoked
                    core.replace_namespaced_secret(name, namespace, manifest)
                    say(f"  replaced Secret {namespace}/{name} (allow-list)")
                else:
                    say(f"  kept the existing Secret {namespace}/{name}")
        for client in revoked or []:
            try:
                core.delete_namespaced_secret(f"{prefix}-client-{client}", namespace)
                say(f"  deleted Secret {namespace}/{prefix}-client-{client}")
            except ApiException as exc:
                if exc.status != 404:
                    raise
    except ApiException as exc:
        raise api_error(exc, "create or replace", "secrets", namespace, error=RunnableK8sError) from exc
    except OSError as exc:  # the API server cannot be reached (urllib3's errors are OSErrors)
        raise RunnableK8sError(f"could not reach the Kubernetes API to write Secrets in namespace {namespace!r}: "
                               f"{exc}. Check the kubeconfig's server and that `kubectl get secrets` works") from exc
