"""One home for defaults: ``worker/defaults.py`` decides, and the CLI, the worker program,
``LocalPool``, the autoscaler, the ephemeral launcher, ``RunnableK8s`` and the chart all agree with
it. The CLI tests change a value in the module and see the flag's default change with it, so they
fail when a flag goes back to a literal of its own, even an equal one."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pool import LocalPool, RunnableK8s
from pool.cli import build_parser
from pool.client import connection
from pool.ephemeral.podspec import runner_pod
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings
from worker import __main__ as worker_main
from worker import defaults
from worker.warm import WarmWorker

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "worker-pool"

# values.yaml path -> (name in worker.defaults, how the module's value reads in the chart)
CHART_VALUES: dict[str, tuple[str, Any]] = {
    "worker.slots": ("WORKER_CONCURRENCY", None),
    "worker.threads": ("WORKER_THREADS", None),
    "worker.cacheSize": ("WORKER_CACHE_SIZE", None),
    "worker.gracePeriodSeconds": ("WORKER_GRACE_PERIOD", None),
    "broker.port": ("BROKER_PORT", None),
    "service.port": ("BROKER_PORT", None),
    "broker.maxMessageBytes": ("MAX_MESSAGE_BYTES", None),
    "broker.queueSize": ("QUEUE_SIZE", None),
    "broker.clientQueueSize": ("CLIENT_QUEUE_SIZE", None),
    "broker.clientQueueBytes": ("CLIENT_QUEUE_BYTES", None),
    "broker.maxUnreadBytes": ("MAX_UNREAD_BYTES", None),
    # The chart hands the container's limit to the broker, whose budgets derive from it.
    "broker.resources.limits.memory": ("BROKER_MEMORY_LIMIT", lambda limit: f"{limit // 2**20}Mi"),
    "broker.queueTimeout": ("QUEUE_TIMEOUT", None),
    "autoscaling.minReplicas": ("AUTOSCALE_MIN", None),
    "autoscaling.maxReplicas": ("AUTOSCALE_MAX", None),
    "autoscaling.targetTasksPerSlot": ("AUTOSCALE_TARGET", None),
    "autoscaling.targetInFlightPerWorker": ("AUTOSCALE_IN_FLIGHT", None),
    "autoscaling.stabilizationWindowSeconds": ("AUTOSCALE_WINDOW", None),
    "autoscaling.scaleToZeroIdleSeconds": ("AUTOSCALE_IDLE", None),
    "image.repository": ("EPHEMERAL_IMAGE", lambda image: image.rsplit(":", 1)[0]),
}

# `runnable-k8s SUBCOMMAND` (no flags) -> {argparse dest: name in worker.defaults}
CLI_DEFAULTS: dict[str, dict[str, str]] = {
    "broker": {
        "bind": "BROKER_BIND",
        "max_message_bytes": "MAX_MESSAGE_BYTES",
        "queue_size": "QUEUE_SIZE",
        "client_queue_size": "CLIENT_QUEUE_SIZE",
        "client_queue_bytes": "CLIENT_QUEUE_BYTES",
        "max_unread_bytes": "MAX_UNREAD_BYTES",
        "queue_timeout": "QUEUE_TIMEOUT",
        "max_worker_slots": "MAX_WORKER_SLOTS",
        "max_connections_per_key": "MAX_CONNECTIONS_PER_KEY",
        "autoscale_min": "AUTOSCALE_MIN",
        "autoscale_max": "AUTOSCALE_MAX",
        "autoscale_target": "AUTOSCALE_TARGET",
        "autoscale_in_flight": "AUTOSCALE_IN_FLIGHT",
        "autoscale_window": "AUTOSCALE_WINDOW",
        "autoscale_idle": "AUTOSCALE_IDLE",
    },
    # No port: a local pool listens on an ipc:// socket only its user can open (--port N: tcp with keys).
    "local": {"workers": "LOCAL_WORKERS", "slots": "WORKER_CONCURRENCY", "threads": "WORKER_THREADS"},
    "status": {"connect_timeout": "CONNECT_TIMEOUT"},
    "gc": {"older_than": "GC_OLDER_THAN"},
}
WORKER_CLI_DEFAULTS = {"slots": "WORKER_CONCURRENCY", "threads": "WORKER_THREADS",
                       "cache_size": "WORKER_CACHE_SIZE",
                       "grace_period": "WORKER_GRACE_PERIOD"}


def chart_value(values: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        values = values[key]
    return values


def expected_in_chart(name: str, transform: Any) -> Any:
    value = getattr(defaults, name)
    return transform(value) if transform else value


def cli_args(*argv: str) -> dict[str, Any]:
    return vars(build_parser().parse_args(list(argv)))


def replace_with_markers(monkeypatch: pytest.MonkeyPatch, names: Any) -> dict[str, Any]:
    """Give each named default an odd value of its own type, which no literal in the code has:
    a flag that shows it read the module, not a copy of its value."""
    markers: dict[str, Any] = {}
    for i, name in enumerate(sorted(set(names))):
        value = getattr(defaults, name)
        markers[name] = f"tcp://127.0.0.9:{40000 + i}" if isinstance(value, str) else type(value)(987_650 + i)
        monkeypatch.setattr(defaults, name, markers[name])
    return markers


# ---------------------------------------------------------------------------- the chart


@pytest.mark.parametrize("path", sorted(CHART_VALUES))
def test_chart_values_agree_with_the_defaults_module(path: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    name, transform = CHART_VALUES[path]
    assert chart_value(values, path) == expected_in_chart(name, transform), (
        f"charts/worker-pool/values.yaml {path} disagrees with worker.defaults.{name}")


def test_the_chart_readme_table_agrees_with_values_and_the_module() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[\w.]+`", cells[0]) and cells[3].startswith("`"):
            rows[cells[0].strip("`")] = (cells[2].split()[0], cells[3].split("`")[1])
    assert set(rows) == set(CHART_VALUES), "the README's table of flag values lists other values than the test"
    for path, (written, name) in rows.items():
        assert name == CHART_VALUES[path][0], f"README: {path} names {name}"
        assert yaml.safe_load(written) == chart_value(values, path), f"README: {path} says {written}"


def test_the_chart_drains_a_worker_for_longer_than_its_grace_period() -> None:
    worker = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]
    # null: the template gives the Pod gracePeriodSeconds + 15, so a scale-down is never cut short.
    assert worker["terminationGracePeriodSeconds"] is None or \
        worker["terminationGracePeriodSeconds"] > worker["gracePeriodSeconds"]


# ---------------------------------------------------------------------------- the programs


@pytest.mark.parametrize("command", sorted(CLI_DEFAULTS))
def test_cli_flags_default_to_the_defaults_module(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = CLI_DEFAULTS[command]
    parsed = cli_args(command)
    for dest, name in mapping.items():
        assert parsed[dest] == getattr(defaults, name), f"runnable-k8s {command} --{dest}"
    # Read from the module at parse time, not a copy of its value:
    markers = replace_with_markers(monkeypatch, mapping.values())
    parsed = cli_args(command)
    for dest, name in mapping.items():
        assert parsed[dest] == markers[name], f"runnable-k8s {command} --{dest} does not follow worker.defaults.{name}"


def test_cli_help_shows_each_default(capsys: pytest.CaptureFixture[str]) -> None:
    for command, mapping in CLI_DEFAULTS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in mapping.values():
            assert f"default {getattr(defaults, name)}" in text, f"runnable-k8s {command} --help, {name}"


def test_worker_program_flags_default_to_the_defaults_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNABLE_K8S_CONCURRENCY", raising=False)
    parsed = vars(worker_main.parse_args(["--stdio"]))
    for dest, name in WORKER_CLI_DEFAULTS.items():
        assert parsed[dest] == getattr(defaults, name), f"python -m worker --{dest}"
    markers = replace_with_markers(monkeypatch, WORKER_CLI_DEFAULTS.values())
    parsed = vars(worker_main.parse_args(["--stdio"]))
    for dest, name in WORKER_CLI_DEFAULTS.items():
        assert parsed[dest] == markers[name], f"python -m worker --{dest} does not follow worker.defaults.{name}"


@pytest.mark.parametrize("path", ["pool/cli.py", "worker/__main__.py"])
def test_no_flag_repeats_a_default_as_a_literal(path: str) -> None:
    # None means "not set" everywhere (EPHEMERAL_SECRET_NAME is None: no Secret), not a default
    # that a flag could repeat.
    owned = {repr(value) for name, value in vars(defaults).items() if name.isupper() and value is not None}
    tree = ast.parse((ROOT / path).read_text())
    repeated = [
        f"line {node.lineno}: {ast.unparse(node)[:80]}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
        for keyword in node.keywords
        if keyword.arg == "default" and isinstance(keyword.value, ast.Constant)
        and repr(keyword.value.value) in owned
    ]
    assert repeated == [], f"{path}: use worker.defaults instead of"


def test_broker_budgets_follow_the_memory_limit_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from pool.cli import broker_budget_options, memory_bytes

    monkeypatch.delenv("RUNNABLE_K8S_MEMORY_LIMIT", raising=False)
    plain = broker_budget_options(build_parser().parse_args(["broker"]))
    assert plain == {"runnable_store_bytes": defaults.RUNNABLE_STORE_BYTES, "queue_bytes": defaults.QUEUE_BYTES,
                     "client_queue_size": defaults.CLIENT_QUEUE_SIZE,
                     "client_queue_bytes": defaults.CLIENT_QUEUE_BYTES, "max_unread_bytes": defaults.MAX_UNREAD_BYTES,
                     "max_connections_per_key": defaults.MAX_CONNECTIONS_PER_KEY}
    # The chart's default limit gives the module's defaults: the two agree.
    assert defaults.broker_budgets(defaults.BROKER_MEMORY_LIMIT) == {
        "runnable_store_bytes": defaults.RUNNABLE_STORE_BYTES, "queue_bytes": defaults.QUEUE_BYTES}
    gib = broker_budget_options(build_parser().parse_args(["broker", "--memory-limit", "1Gi"]))
    assert {k: gib[k] for k in ("runnable_store_bytes", "queue_bytes")} == defaults.broker_budgets(2**30)
    fixed = broker_budget_options(build_parser().parse_args(
        ["broker", "--memory-limit", "1Gi", "--queue-bytes", "5000"]))
    assert fixed["queue_bytes"] == 5000 and fixed["runnable_store_bytes"] == 2**30 * 3 // 16
    # What the chart does: the Downward API's limit in bytes, in the environment.
    monkeypatch.setenv("RUNNABLE_K8S_MEMORY_LIMIT", str(256 * 2**20))
    from_env = broker_budget_options(build_parser().parse_args(["broker"]))
    assert from_env["runnable_store_bytes"] == 256 * 2**20 * 3 // 16
    for text, expected in (("536870912", 2**29), ("512Mi", 2**29), ("1Gi", 2**30), ("500M", 500 * 10**6),
                           ("64ki", 2**16)):
        assert memory_bytes(text) == expected
    for bad in ("", "lots", "-1", "0", "1.5Gi", "12Qi"):
        with pytest.raises(ValueError, match="not a memory size"):
            memory_bytes(bad)


@pytest.mark.timeout(30)
def test_a_broker_with_a_bad_memory_limit_says_so_and_exits() -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pool", "broker", "--bind", "tcp://127.0.0.1:0", "--announce"],
                            capture_output=True, text=True, timeout=20,
                            env={**os.environ, "RUNNABLE_K8S_MEMORY_LIMIT": "half the machine"})
    assert result.returncode == 2
    assert "not a memory size: 'half the machine'" in result.stderr and "READY" not in result.stdout


# ---------------------------------------------------------------------------- the library


def signature_defaults(obj: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(obj).parameters.items()}


def test_local_pool_defaults_match_the_module() -> None:
    params = signature_defaults(LocalPool)
    assert params["workers"] == defaults.LOCAL_WORKERS
    assert params["slots"] == defaults.WORKER_CONCURRENCY
    assert params["threads"] == defaults.WORKER_THREADS
    # No port: an embedded pool listens on an ipc:// socket file of its own (two run side by side),
    # and secure=None means "reachable only by this user" (ipc, or keys when a port is given).
    assert params["port"] is None
    assert params["secure"] is None


def test_warm_worker_defaults_match_the_module() -> None:
    params = signature_defaults(WarmWorker)
    assert params["slots"] == defaults.WORKER_CONCURRENCY
    assert params["threads"] == defaults.WORKER_THREADS
    assert params["cache_size"] == defaults.WORKER_CACHE_SIZE
    assert params["grace_period"] == defaults.WORKER_GRACE_PERIOD


def test_autoscaler_defaults_match_the_module() -> None:
    settings = AutoscaleSettings()
    assert (settings.min, settings.max, settings.target, settings.in_flight, settings.window, settings.idle) == (
        defaults.AUTOSCALE_MIN, defaults.AUTOSCALE_MAX, defaults.AUTOSCALE_TARGET, defaults.AUTOSCALE_IN_FLIGHT,
        defaults.AUTOSCALE_WINDOW, defaults.AUTOSCALE_IDLE)

    class Scaler:
        def current(self) -> int:
            return 1

        def scale(self, replicas: int) -> None:
            pass

        def describe(self) -> str:
            return "none"

    autoscaler = Autoscaler(settings, Scaler())
    assert autoscaler.resync == defaults.AUTOSCALE_RESYNC
    # Before any worker registered, a worker has the worker's default slots.
    assert autoscaler.slots_per_worker == defaults.WORKER_CONCURRENCY


def test_client_and_ephemeral_defaults_match_the_module() -> None:
    fields = RunnableK8s.model_fields
    assert fields["k8s_container_image"].default == defaults.EPHEMERAL_IMAGE
    assert fields["k8s_secret_name"].default == defaults.EPHEMERAL_SECRET_NAME
    assert fields["connect_timeout"].default == defaults.CONNECT_TIMEOUT
    assert connection.DEFAULT_CONNECT_TIMEOUT == defaults.CONNECT_TIMEOUT
    pod = runner_pod(image=defaults.EPHEMERAL_IMAGE, namespace="default")
    assert pod["spec"]["activeDeadlineSeconds"] == defaults.EPHEMERAL_ACTIVE_DEADLINE
    from pool.ephemeral.k8s_launcher import KubernetesLauncher

    assert signature_defaults(KubernetesLauncher)["start_timeout"] == defaults.EPHEMERAL_START_TIMEOUT


def test_the_defaults_module_imports_nothing() -> None:
    # Every process reads it, the one-shot worker too: it must cost nothing to import.
    tree = ast.parse((ROOT / "worker" / "defaults.py").read_text())
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == ["from __future__ import annotations"]
