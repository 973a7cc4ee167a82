# syntax=docker/dockerfile:1
# The runnable-k8s worker image: runs warm workers (`python -m worker --connect ...`), one-shot
# ephemeral workers (`python -m worker --stdio`) and the broker (`runnable-k8s broker ...`).
#
#   docker build -t registry.example.com/team/runnable-k8s-worker:0.1.0 .
#   docker build --build-arg PYTHON_VERSION=3.12 --build-arg EXTRAS=openai \
#                --build-arg PIP_PACKAGES="langchain-core==1.7.2 cloudpickle==3.1.1" -t ... .
#
# Client and workers must share the Python minor version and the langchain-core and cloudpickle
# major.minor versions (calls fail with IncompatibleWorker otherwise): build with the client's
# PYTHON_VERSION, and pin those two with PIP_PACKAGES when the client pins them.
#
# Extend it with what your runnables import; the virtualenv belongs to the image's user, so a
# plain `pip install` works:
#
#   FROM registry.example.com/team/runnable-k8s-worker:0.1.0
#   RUN pip install langchain-openai
ARG PYTHON_VERSION=3.11
# The base of both stages. Any image with `python` (PYTHON_VERSION), `pip` and `python -m venv`
# and the Debian tools groupadd/useradd will do; the test cluster builds this file with buildah
# from a local stand-in (tests/cluster/worker-image.sh).
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# ---- build: the project's wheel and its dependencies, as wheels ---------------------------------
FROM ${BASE_IMAGE} AS build
ARG EXTRAS=""
ARG PIP_PACKAGES=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY pool ./pool
RUN pip wheel --no-deps --wheel-dir /wheels/project . \
 && project="$(ls /wheels/project/*.whl)" \
 && pip wheel --wheel-dir /wheels/deps "${project}${EXTRAS:+[$EXTRAS]}" ${PIP_PACKAGES}

# ---- runtime: slim Python, a virtualenv at /opt/venv, a non-root user ---------------------------
FROM ${BASE_IMAGE}
ARG EXTRAS=""
ARG PIP_PACKAGES=""
ARG UID=10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid "${UID}" app \
 && useradd --uid "${UID}" --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && python -m venv /opt/venv \
 && chown -R app:app /opt/venv
USER ${UID}:${UID}
# The wheels are bind-mounted from the build stage, so they never become a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    project="$(ls /wheels/project/*.whl)" \
 && pip install --no-index --find-links /wheels/deps "${project}${EXTRAS:+[$EXTRAS]}" ${PIP_PACKAGES} \
 && python -m worker --help >/dev/null \
 && runnable-k8s --help >/dev/null
WORKDIR /home/app
# A warm worker by default (broker address from RUNNABLE_K8S_BROKER); the chart passes the full
# command: `python -m worker --connect ...` or `runnable-k8s broker ...`.
CMD ["python", "-m", "worker"]
