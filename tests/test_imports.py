"""Heavy imports are lazy (docs/design.md#layout): ``import pool``, the warm worker and the one-shot worker
(which an ephemeral call starts once per call) load neither the kubernetes client, nor
prometheus_client, nor matplotlib, nor tqdm until a feature needs them. Each check runs in a fresh
interpreter, so what the test process itself imported does not count."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

from worker import codec
from worker import protocol as P

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("kubernetes", "prometheus_client", "matplotlib", "tqdm")
LOADED = (f"sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r})")


def loaded_after(code: str, stdin: bytes = b"") -> tuple[list[str], subprocess.CompletedProcess[bytes]]:
    """Run ``code`` in a fresh interpreter; the heavy modules loaded by then, and the process."""
    script = f"{code}\nimport os, sys\nos.write(2, ('LOADED %r\\n' % ({LOADED},)).encode())\n"
    proc = subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    line = next(x for x in proc.stderr.decode().splitlines() if x.startswith("LOADED "))
    return ast.literal_eval(line.removeprefix("LOADED ")), proc


@pytest.mark.timeout(60)
def test_import_pool_loads_no_heavy_module() -> None:
    loaded, _ = loaded_after("import pool")
    assert loaded == []


@pytest.mark.timeout(60)
def test_the_cli_parser_loads_no_heavy_module() -> None:
    # Every `runnable-k8s` command builds the whole parser (bench's flags included) first.
    loaded, _ = loaded_after("import pool.cli\npool.cli.build_parser()")
    assert loaded == []


@pytest.mark.timeout(60)
def test_the_warm_worker_loads_no_heavy_module() -> None:
    loaded, _ = loaded_after("import worker.__main__, worker.warm\n"
                             "worker.__main__.parse_args(['--connect', 'tcp://127.0.0.1:1'])")
    assert loaded == []


@pytest.mark.timeout(60)
def test_a_one_shot_worker_runs_its_task_without_heavy_modules_or_the_warm_loop() -> None:
    """`python -m worker --stdio` for real: HELLO and a TASK on stdin, the RESULT on stdout."""
    runnable = codec.dumps(RunnableLambda(lambda x: x + 1))
    header = P.TaskHeader("invoke", codec.digest(runnable), None, 0, {})
    stdin = (P.stdio_line(P.HELLO, P.encode_json(P.environment()))
             + P.stdio_line(P.TASK, header.to_bytes(), runnable, codec.dumps((41, {}))))
    code = ("import sys\nfrom worker.__main__ import main\nassert main(['--stdio']) == 0\n"
            "os_loaded = sorted(m for m in sys.modules\n"
            "                   if m in {'worker.warm', 'worker.tasks', 'worker.curve', 'worker.transport', 'zmq'})\n"
            "import os\nos.write(2, ('WARM %r\\n' % (os_loaded,)).encode())")
    loaded, proc = loaded_after(code, stdin)
    replies = [P.parse_stdio_line(line) for line in proc.stdout.splitlines(keepends=True)]
    results = [fields for message in replies if message for command, fields in [message] if command == P.RESULT]
    assert results, f"no RESULT on stdout: {proc.stdout[:500]!r} / {proc.stderr[-1000:]!r}"
    assert codec.loads_result(results[0][0]) == 42
    assert loaded == []
    warm = next(x for x in proc.stderr.decode().splitlines() if x.startswith("WARM "))
    # It speaks the protocol as text lines: no warm loop and no pyzmq, paid for on every ephemeral call.
    assert ast.literal_eval(warm.removeprefix("WARM ")) == [], "the one-shot worker loaded the warm loop or pyzmq"


@pytest.mark.timeout(60)
def test_the_broker_command_loads_no_langchain_so_a_crashed_broker_is_back_fast():
    """A broker process (``runnable-k8s broker``, and the one LocalPool starts) routes bytes: it
    never needs LangChain, cloudpickle or pydantic. Importing them cost every broker start about
    a second of CPU (a restart after a crash included)."""
    script = ("import sys\nimport pool.cli, pool.broker.server\npool.cli.build_parser()\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'langchain_core', 'cloudpickle', 'pydantic'}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert proc.stdout.decode().strip() == "[]"
    help_run = subprocess.run([sys.executable, "-X", "importtime", "-m", "pool", "broker", "--help"],
                              capture_output=True, cwd=ROOT, timeout=60)
    assert help_run.returncode == 0 and b"--bind" in help_run.stdout
    assert b"langchain_core" not in help_run.stderr and b"cloudpickle" not in help_run.stderr


def test_the_bench_command_lines_defaults_name_the_benchs_own_workloads_and_image():
    from pool.bench import arguments, workloads
    from pool.cli import build_parser
    from pool.client.runnable import DEFAULT_IMAGE

    parsed = build_parser().parse_args(["bench"])
    assert parsed.workload == list(arguments.DEFAULT_WORKLOADS)
    assert set(parsed.workload) < set(workloads.WORKLOADS)  # known workloads; llm only on request
    assert parsed.image == DEFAULT_IMAGE
