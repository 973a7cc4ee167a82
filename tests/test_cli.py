"""What a new user meets in the first hour on the command line: --version, a help line for every
flag (and no reST markup in any), one-line errors instead of tracebacks, one name per meaning
(--slots for the tasks a worker runs at once, --in-flight for the bench's calls in flight, the old
--concurrency still working with a deprecation line), bench --quick, and a worker that says it
could not reach its broker rather than that it lost it.

Everything here runs the real programs (``python -m pool``, ``python -m worker``) as processes,
except the help checks, which read the parsers the programs build."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from pool import LocalPool
from pool.cli import build_parser
from tests.support.processes import stop_process
from tests.support.waiting import wait_for
from worker import __main__ as worker_main
from worker.protocol import PROTOCOL

DEPRECATED = "is deprecated; use"


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------- --version


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", [("-m", "pool"), ("-m", "worker")], ids=["runnable-k8s", "worker"])
def test_version_prints_the_package_and_the_protocol_version(program: tuple[str, str]) -> None:
    result = run(*program, "--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert metadata.version("runnable-k8s") in line and f"protocol {PROTOCOL.decode()}" in line, line
    assert "\n" not in line


# ---------------------------------------------------------------------------- help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PROGRAMS: dict[str, argparse.ArgumentParser] = {"python -m worker": worker_main.build_parser(),
                                                **{f"runnable-k8s {verb}": sub
                                                   for verb, sub in _subparsers(build_parser()).items()}}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_flag_of_every_verb_has_a_help_line(program: str) -> None:
    parser = PROGRAMS[program]
    missing = [action.option_strings or [action.dest] for action in parser._actions
               if action.help is None or not str(action.help).strip()]
    assert missing == [], f"{program}: flags without help"
    assert parser.description, f"{program}: no description"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verb", ["", *sorted(_subparsers(build_parser()))])
def test_help_output_has_no_rest_markup(verb: str) -> None:
    result = run("-m", "pool", *([verb] if verb else []), "--help")
    assert result.returncode == 0, result.stderr
    for markup in ("``", ":mod:", ":class:", ":func:"):
        assert markup not in result.stdout, f"runnable-k8s {verb} --help shows {markup!r}"


@pytest.mark.timeout(60)
def test_the_worker_programs_help_has_no_rest_markup() -> None:
    result = run("-m", "worker", "--help")
    assert result.returncode == 0 and "--slots" in result.stdout
    assert "``" not in result.stdout


def test_bench_help_shows_quick_as_its_first_example() -> None:
    text = _subparsers(build_parser())["bench"].format_help()
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith("runnable-k8s bench")]
    assert examples and examples[0] == "runnable-k8s bench --quick", examples
    assert text.index("examples:") < text.index("options:")


# ---------------------------------------------------------------------------- Kubernetes without a kubeconfig


def _no_cluster_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no Kubernetes configuration: KUBECONFIG names a missing file, and no
    in-cluster service variables (so the client cannot fall back to a Pod's configuration)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(tmp_path / "no-such-kubeconfig")
    env["HOME"] = str(tmp_path)
    return env


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["keys", "KEYS", "--k8s-secret", "pool-keys"], ["gc"]], ids=["keys", "gc"])
def test_a_kubernetes_verb_without_a_kubeconfig_says_what_to_do_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    argv = [str(tmp_path / "keys") if arg == "KEYS" else arg for arg in argv]
    result = subprocess.run([sys.executable, "-m", "pool", *argv], capture_output=True, text=True, timeout=50,
                            env=_no_cluster_env(tmp_path), stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--kubeconfig" in lines[0] and "KUBECONFIG" in lines[0] and "no-such-kubeconfig" in lines[0], lines[0]


# ---------------------------------------------------------------------------- --slots, --in-flight, --concurrency


def _start_local(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """``runnable-k8s local FLAGS``; returns the process and the address of its first line."""
    proc = subprocess.Popen([sys.executable, "-m", "pool", "local", "--workers", "2", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 40)
    first = proc.stdout.readline() if ready else ""
    if " at " not in first:
        stop_process(proc)
        pytest.fail(f"runnable-k8s local did not start: {first!r}")
    return proc, first.rsplit(" at ", 1)[1].strip()


def _stop_local(proc: subprocess.Popen[str]) -> str:
    """SIGTERM (what Ctrl-C's handler does too), wait, and return its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    return stderr


def _status(address: str) -> dict[str, Any]:
    result = run("-m", "pool", "status", "--pool", address, "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("flags", "slots", "deprecated"), [(["--slots", "3"], 3, False),
                                                            (["--concurrency", "5"], 5, True)],
                         ids=["slots", "old-concurrency"])
def test_local_gives_each_worker_the_slots_asked_for(flags: list[str], slots: int, deprecated: bool) -> None:
    proc, address = _start_local(*flags)
    try:
        workers = wait_for(lambda: (lambda ws: ws if len(ws) == 2 else None)(_status(address)["workers"]), 30,
                           "both local workers registered")
        assert [w["slots"] for w in workers] == [slots, slots]
    finally:
        stderr = _stop_local(proc)
    assert proc.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if DEPRECATED in line]
    if deprecated:
        assert lines == ["runnable-k8s local: --concurrency is deprecated; use --slots (same meaning)"], stderr
    else:
        assert lines == [], stderr
    if address.startswith("ipc://"):
        assert not Path(address.removeprefix("ipc://")).exists(), "the pool's socket file outlived it"


@pytest.mark.timeout(90)
def test_the_old_local_pool_and_worker_names_still_work_with_a_deprecation() -> None:
    with pytest.warns(DeprecationWarning, match="slots="):
        pool = LocalPool(workers=1, concurrency=2)
    with pool:
        assert pool.slots == 2 and pool.concurrency == 2
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--connect", pool.address, "--concurrency", "4",
                                   "--exit-with-parent", str(os.getpid())],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            slots = wait_for(lambda: (lambda ws: sorted(w["slots"] for w in ws) if len(ws) == 2 else None)(
                pool.status()["workers"]), 30, "the extra worker registered")
            assert slots == [2, 4]
        finally:
            worker.send_signal(signal.SIGTERM)
            _, stderr = worker.communicate(timeout=30)
    assert "python -m worker: --concurrency is deprecated; use --slots (same meaning)" in stderr, stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert LocalPool(workers=0, slots=3).slots == 3


def test_bench_takes_in_flight_and_still_the_old_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "--in-flight", "1,8"]).in_flight == [1, 8]
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["bench", "--concurrency", "2,4"]).in_flight == [2, 4]
    assert capsys.readouterr().err.strip() == (
        "runnable-k8s bench: --concurrency is deprecated; use --in-flight (same meaning)")
    assert parser.parse_args(["bench"]).in_flight is None


# ---------------------------------------------------------------------------- bench --quick


@pytest.mark.timeout(180)
def test_bench_quick_runs_warm_echo_and_io_against_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    result = run("-m", "pool", "bench", "--quick", "--no-progress", "--json", str(out), timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures["modes"]) == ["warm"]
    assert set(figures["modes"]["warm"]["workloads"]) == {"echo", "io"}
    assert figures["floor"]["p50_ms"] > 0 and figures["settings"]["concurrency"] == [1, 16]
    assert "scaling" not in figures and "big_runnable" not in figures["modes"]["warm"]
    first = result.stdout.splitlines()[0]
    assert "warm = LocalPool on this host (2 workers x" in first and "ephemeral" not in first, first


def test_quick_leaves_flags_given_with_it_alone() -> None:
    parser = build_parser()
    for argv in (["bench", "--quick", "--calls", "7"], ["bench", "--calls", "7", "--quick"]):
        args = parser.parse_args(argv)
        assert args.calls == 7 and args.quick and args.modes == ["warm"], argv


# ---------------------------------------------------------------------------- a worker that never connected


@pytest.mark.timeout(60)
def test_a_worker_that_never_reached_its_broker_says_so_and_what_to_check(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/nobody-listens.sock"
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--connect", address, "--exit-with-parent",
                               str(os.getpid())], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert worker.stderr is not None
    seen: list[str] = []

    def said_it() -> str | None:
        if select.select([worker.stderr], [], [], 0.2)[0]:
            seen.append(worker.stderr.readline())
        return next((line for line in seen if "broker" in line), None)

    try:
        line = wait_for(said_it, 30, "the worker's line about the broker")
    finally:
        stop_process(worker)
    assert f"could not reach the broker at {address}" in line, line
    assert "Check that a broker runs there" in line and "lost the broker" not in line, line
