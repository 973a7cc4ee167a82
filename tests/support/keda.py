"""KEDA for the tests: its Go module (the CRDs a release must match) and its operator, run on this
host against the test cluster (tests/cluster), so the chart's ScaledObject is acted on by KEDA
itself.

    crds = keda_module_dir() / "config/crd/bases"
    with KedaCrds(cp, crds), KedaOperator(cp, namespace, folder):
        ...                     # ScaledObjects in `namespace` are reconciled and scaled

The operator (tests/cluster/build-binaries.sh keda) runs with the admin kubeconfig, watching one
namespace, every listener on 127.0.0.1, certificate rotation off (its gRPC metrics service gets a
throw-away certificate; nothing connects to it: KEDA's metrics server, which would serve the HPA
KEDA creates, is not run, because its own metrics listener binds every interface). So the
operator's part is live: it validates the ScaledObject, polls the trigger, makes the HPA and scales
the workload between zero and its minimum itself. On exit the operator first deletes the
namespace's ScaledObjects (it must run to remove their finalizer), then stops; then the CRDs are
deleted (any finalizer left by an operator that died is removed first, or the CRD would stay).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.cluster import BIN, CACHE, VERSIONS
from tests.support.ports import free_port
from tests.support.processes import Started, fail_if_exited, stop_process
from tests.support.waiting import wait_for

__all__ = ["KEDA_MODULE", "KEDA_OPERATOR", "KEDA_VERSION", "KedaCrds", "KedaOperator", "keda_module_dir"]

KEDA_MODULE = VERSIONS["KEDA_MODULE"]
KEDA_VERSION = VERSIONS["KEDA_VERSION"]
KEDA_OPERATOR = BIN / "keda-operator"


def go_binary() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.access(p, os.X_OK)), None)


def keda_module_dir() -> Path:
    """KEDA's module source (``go mod download``, once, into the cluster cache)."""
    go = go_binary()
    if go is None:
        raise RuntimeError("no Go toolchain: KEDA's CRDs come from its Go module (go mod download)")
    env = {**os.environ, "GOMODCACHE": str(CACHE / "gomod"), "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    result = subprocess.run([go, "mod", "download", "-json", f"{KEDA_MODULE}@{KEDA_VERSION}"], capture_output=True,
                            text=True, env=env, timeout=300, cwd=CACHE if CACHE.is_dir() else None)
    info = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {KEDA_MODULE}@{KEDA_VERSION} failed: {result.stdout}{result.stderr}")
    return Path(info["Dir"])


class KedaCrds(Started):
    """KEDA's CustomResourceDefinitions (every one its operator watches) installed while the block runs."""

    def __init__(self, cp: Any, folder: Path) -> None:
        self.cp = cp
        self.crds = [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))]
        self.created: list[str] = []

    def start(self) -> None:
        from kubernetes import client

        api = client.ApiextensionsV1Api(self.cp.api_client)
        for crd in self.crds:
            api.create_custom_resource_definition(crd)
            self.created.append(crd["metadata"]["name"])
        for name in self.created:
            wait_for(lambda n=name: any(c.type == "Established" and c.status == "True"
                                        for c in api.read_custom_resource_definition(n).status.conditions or []),
                     30, f"the CRD {name} to be established")

    def close(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = client.ApiextensionsV1Api(self.cp.api_client)
        objects = client.CustomObjectsApi(self.cp.api_client)
        for crd in self.crds:
            if crd["metadata"]["name"] not in self.created:
                continue
            group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
            version = crd["spec"]["versions"][0]["name"]
            # Resources whose finalizer no operator will remove any more would keep the CRD forever.
            with contextlib.suppress(ApiException):
                for item in objects.list_cluster_custom_object(group, version, plural)["items"]:
                    meta = item["metadata"]
                    if meta.get("finalizers"):
                        patch = {"metadata": {"finalizers": None}}
                        if "namespace" in meta:
                            objects.patch_namespaced_custom_object(group, version, meta["namespace"], plural,
                                                                   meta["name"], patch)
                        else:
                            objects.patch_cluster_custom_object(group, version, plural, meta["name"], patch)
            with contextlib.suppress(ApiException):
                api.delete_custom_resource_definition(crd["metadata"]["name"])

        def gone() -> bool:
            names = {c.metadata.name for c in api.list_custom_resource_definition().items}
            return not names & set(self.created)

        wait_for(gone, 60, "KEDA's CRDs to be deleted")
        self.created = []


def _certificates(folder: Path) -> None:
    """ca.crt, tls.crt, tls.key for the operator's gRPC metrics service (ECDSA P-256, one day)."""
    folder.mkdir(parents=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext = folder / "leaf.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:keda-operator\nextendedKeyUsage=serverAuth,clientAuth\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", *key, "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.crt"), "-days", "1",
            "-subj", "/CN=keda-test-ca")
    openssl("req", "-new", *key, "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.csr"),
            "-subj", "/CN=keda-operator")
    openssl("x509", "-req", "-in", str(folder / "tls.csr"), "-CA", str(folder / "ca.crt"), "-CAkey",
            str(folder / "ca.key"), "-set_serial", "1", "-days", "1", "-extfile", str(ext),
            "-out", str(folder / "tls.crt"))


class KedaOperator(Started):
    """KEDA's operator watching ``namespace`` while the block runs; its log in ``folder``."""

    def __init__(self, cp: Any, namespace: str, folder: Path) -> None:
        if not os.access(KEDA_OPERATOR, os.X_OK):
            raise RuntimeError(f"{KEDA_OPERATOR} is not built: bash tests/cluster/build-binaries.sh keda")
        self.cp, self.namespace, self.folder = cp, namespace, folder
        self.log = folder / "keda-operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        certs = self.folder / "keda-certs"
        _certificates(certs)
        (self.folder / "keda-ca").mkdir()
        health = free_port()
        env = {**os.environ, "POD_NAMESPACE": self.namespace, "WATCH_NAMESPACE": self.namespace,
               "KEDA_CLUSTER_OBJECT_NAMESPACE": self.namespace, "KEDA_HTTP_DEFAULT_TIMEOUT": "3000",
               "KUBECONFIG": self.cp.kubeconfig}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(KEDA_OPERATOR), f"--kubeconfig={self.cp.kubeconfig}",
                 f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--health-probe-bind-address=127.0.0.1:{health}",
                 f"--metrics-service-bind-address=127.0.0.1:{free_port()}", f"--cert-dir={certs}",
                 f"--ca-dir={self.folder / 'keda-ca'}", "--enable-cert-rotation=false",
                 "--enable-webhook-patching=false", "--enable-apiservice-patching=false",
                 "--zap-log-level=info", "--zap-encoder=console"],
                stdout=log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            fail_if_exited(self.proc, "keda-operator", self.log)
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as response:
                return bool(response.status == 200)

        wait_for(ready, 60, f"keda-operator to be ready (its log: {self.log})", ignore=(OSError,))

    def close(self) -> None:
        """Delete the namespace's ScaledObjects while the operator runs (it removes their
        finalizer, restoring the workload's replicas as KEDA does), then stop it."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if self.proc is None:
            return
        objects = client.CustomObjectsApi(self.cp.api_client)

        def scaled_objects() -> list[dict[str, Any]]:
            try:
                return list(objects.list_namespaced_custom_object("keda.sh", "v1alpha1", self.namespace,
                                                                  "scaledobjects")["items"])
            except ApiException as exc:
                if exc.status == 404:  # the CRD is gone
                    return []
                raise

        try:
            for item in scaled_objects():
                with contextlib.suppress(ApiException):
                    objects.delete_namespaced_custom_object("keda.sh", "v1alpha1", self.namespace, "scaledobjects",
                                                            item["metadata"]["name"])
            wait_for(lambda: not scaled_objects(), 60, "KEDA to finalize the ScaledObjects")
        finally:
            stop_process(self.proc)
            self.proc = None

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]
