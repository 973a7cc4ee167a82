"""The Dockerfile keeps the shape the test cluster's image build relies on.

tests/cluster/worker-image.sh builds THE Dockerfile with buildah from a local stand-in for
python:3.11-slim, passed as `--build-arg BASE_IMAGE=...`; if a stage stopped using BASE_IMAGE,
that stage would try to pull python:slim (impossible there) or, worse, silently differ from what
`docker build .` produces. The first checks read the file only (fast, no engine needed); the last
runs the built image as a Pod on the test cluster (`-m cluster`).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_an_argument_declared_before_the_first_from() -> None:
    steps = _instructions()
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    global_args = dict(rest.split("=", 1) for word, rest in steps[:first_from] if word == "ARG" and "=" in rest)
    # `docker build .` without build arguments still builds from the official slim image.
    assert global_args.get("BASE_IMAGE") == "python:${PYTHON_VERSION}-slim", global_args
    assert "PYTHON_VERSION" in global_args, "BASE_IMAGE refers to PYTHON_VERSION, declare it first"
    names = list(global_args)
    assert names.index("PYTHON_VERSION") < names.index("BASE_IMAGE"), names


def test_every_stage_starts_from_base_image() -> None:
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) >= 2, froms  # the build stage and the runtime stage
    for rest in froms:
        image = rest.split()[0]
        assert image == "${BASE_IMAGE}", f"FROM {rest}: every stage must start from ${{BASE_IMAGE}}"


def test_the_image_runs_as_the_non_root_user_the_chart_expects() -> None:
    steps = _instructions()
    uid = next(rest.split("=", 1)[1] for word, rest in steps if word == "ARG" and rest.startswith("UID="))
    users = [rest for word, rest in steps if word == "USER"]
    assert uid == "10001" and users == ["${UID}:${UID}"], (uid, users)
    values = (DOCKERFILE.parent / "charts" / "worker-pool" / "values.yaml").read_text()
    assert re.search(r"^\s+runAsUser: 10001$", values, re.M), "chart's runAsUser differs from the image's UID"



def test_the_image_build_key_follows_content_not_mtimes(tmp_path: Path) -> None:
    """worker-image.sh skips `buildah build` while this key is unchanged: it must change with any
    byte or path the Dockerfile COPYs or with the build arguments, and with nothing else."""
    import os

    from tests.cluster.image_key import key

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.py").write_text("x = 1\n")
    (tmp_path / "Dockerfile").write_text("FROM ${BASE_IMAGE}\n")
    paths = ["Dockerfile", "pool"]
    first = key(str(tmp_path), "EXTRAS=openai", paths)
    os.utime(tmp_path / "pool" / "a.py", (0, 0))  # a fresh checkout resets mtimes
    (tmp_path / "pool" / "__pycache__").mkdir()
    (tmp_path / "pool" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")  # .dockerignore'd
    assert key(str(tmp_path), "EXTRAS=openai", paths) == first
    assert key(str(tmp_path), "EXTRAS=", paths) != first
    (tmp_path / "pool" / "a.py").write_text("x = 2\n")
    assert key(str(tmp_path), "EXTRAS=openai", paths) != first
    (tmp_path / "pool" / "a.py").write_text("x = 1\n")
    (tmp_path / "pool" / "a.py").rename(tmp_path / "pool" / "b.py")
    assert key(str(tmp_path), "EXTRAS=openai", paths) != first

# The probe a Pod of the worker image runs: who it is, where, which Python, what it can import.
_PROBE = (
    "import importlib.util as u, json, os, sys; "
    "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'cwd': os.getcwd(), "
    "'home': os.environ.get('HOME'), 'prefix': sys.prefix, 'python': sys.version_info[:2], "
    "'modules': {m: bool(u.find_spec(m)) for m in ('worker', 'pool', 'langchain_openai', 'zmq')}}))"
)


@pytest.mark.cluster
def test_the_cluster_runs_the_image_built_from_this_dockerfile(k8s_node, k8s_namespace) -> None:
    """A Pod of the cluster's worker image, with no securityContext, shows the Dockerfile's
    choices (UID 10001, WORKDIR /home/app, the venv, the openai extra): the engine-free image
    it replaced ran as root in / and would fail here."""
    import json
    import time

    from kubernetes import client

    core = k8s_node.control_plane.core()
    core.create_namespaced_pod(k8s_namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="dockerfile-probe"),
        spec=client.V1PodSpec(
            restart_policy="Never", termination_grace_period_seconds=1, automount_service_account_token=False,
            containers=[client.V1Container(name="main", image=k8s_node.worker_image, image_pull_policy="Never",
                                           command=["python", "-c", _PROBE])])))
    deadline = time.monotonic() + 120
    phase = None
    while time.monotonic() < deadline:
        phase = core.read_namespaced_pod("dockerfile-probe", k8s_namespace).status.phase
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    logs = core.read_namespaced_pod_log("dockerfile-probe", k8s_namespace)
    core.delete_namespaced_pod("dockerfile-probe", k8s_namespace, grace_period_seconds=0)
    assert phase == "Succeeded", (phase, logs)
    seen = json.loads(logs.strip().splitlines()[-1])
    print("worker image as a Pod sees it:", seen)
    assert (seen["uid"], seen["gid"]) == (10001, 10001), seen
    assert seen["cwd"] == "/home/app" and seen["home"] == "/home/app", seen
    assert seen["prefix"] == "/opt/venv" and seen["python"] == [3, 11], seen
    assert all(seen["modules"].values()), seen
