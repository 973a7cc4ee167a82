"""The Dockerfile keeps the shape the test cluster's image build relies on.

tests/cluster/worker-image.sh builds THE Dockerfile with buildah from a local stand-in for
python:3.11-slim, passed as `--build-arg BASE_IMAGE=...`; if a stage stopped using BASE_IMAGE,
that stage would try to pull python:slim (impossible there) or, worse, silently differ from what
`docker build .` produces. These checks read the file only: fast, no engine needed.
"""
from __future__ import annotations

import re
from pathlib import Path

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
