"""The README's and docs/security.md's walk-throughs, run as a user would run them.

The blocks come from the markdown itself: a fenced block right after an HTML comment
``<!-- walkthrough: NAME -->`` belongs to walk-through NAME, in document order. So the docs and
this test cannot drift: change a command in the docs and this test runs the new one.

How a block runs:

* ``bash`` blocks, line by line (backslash continuations joined), in one working folder. A line
  ending in ``&`` is started in the background, as a user's shell would, in its own process group;
  when it binds a ``tcp://`` address, the next line waits until that port accepts connections (a
  user waits for the "listening" line). Every other line must exit 0.
* ``python`` blocks, each as a script with this interpreter. A ``# prints: TEXT`` comment says what
  the block's output must contain.

The quickstart's set-up lines (``python3 -m venv .venv``, ``source .venv/bin/activate``,
``pip install ...``) would rebuild a virtual environment from the network. By default they are
checked for their order (a venv is created and activated before anything is installed or run) and
stood in for by this test's own venv; with ``RUNNABLE_K8S_WALKTHROUGH_INSTALL=1`` the whole block
runs verbatim in a fresh copy of the repository's tracked files, installing from the network.

Nothing is left behind: every process started here is stopped by its process group, the working
folders (and the private temp folder the pools make their sockets in) must be empty of pool
folders at the end, and then removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*walkthrough:\s*([\w-]+)\s*-->")
DOC_PORT = "127.0.0.1:5555"


@dataclass
class Block:
    language: str
    code: str


def walkthrough(doc: Path, name: str) -> list[Block]:
    """The fenced blocks marked ``<!-- walkthrough: NAME -->`` in ``doc``, in order."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        marker = MARKER.search(lines[index])
        index += 1
        if not marker or marker.group(1) != name:
            continue
        while index < len(lines) and not lines[index].strip():
            index += 1
        opening = re.match(r"^\s*```(\w*)\s*$", lines[index]) if index < len(lines) else None
        assert opening, f"{doc.name}: the walkthrough marker for {name!r} is not followed by a fenced block"
        body: list[str] = []
        index += 1
        while not lines[index].strip().startswith("```"):
            body.append(lines[index])
            index += 1
        blocks.append(Block(opening.group(1), "\n".join(body) + "\n"))
    assert blocks, f"{doc.name} has no block marked <!-- walkthrough: {name} -->"
    return blocks


def shell_lines(code: str) -> list[str]:
    joined, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.strip().startswith("#"):
            joined.append(line.strip())
    return joined


def short_temp_dir(prefix: str) -> Path:
    """A short path (an ipc:// socket path must fit in about 100 bytes), 0700."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def venv_environment(tmp: Path) -> dict[str, str]:
    """The environment of a user whose venv is this test's interpreter's, with TMPDIR private to
    the test so that what the pools leave behind can be seen."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = sys.prefix
    env["TMPDIR"] = str(tmp)
    for name in ("RUNNABLE_K8S_POOL", "RUNNABLE_K8S_KEYS", "PYTHONPATH"):
        env.pop(name, None)
    return env


class Session:
    """One user's terminal: a working folder, background jobs, and nothing left when it closes."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.jobs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def run_line(self, line: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if line.endswith("&") and not line.endswith("&&"):
            self.start(line[:-1].strip())
            return subprocess.CompletedProcess(line, 0, "", "")
        result = run_alone(["bash", "-e", "-c", line], self.cwd, self.env, timeout)
        assert result.returncode == 0, f"`{line}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result

    def start(self, command: str) -> None:
        log = self.cwd / f"job-{len(self.jobs) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.jobs.append((command, proc, log))
        bound = re.search(r"--bind tcp://([\d.]+):(\d+)", command)
        if bound:
            host, port = bound.group(1), int(bound.group(2))
            wait_for(lambda: self._accepts(host, port) or self._died(proc, log), 60,
                     f"`{command}` to listen on {host}:{port}")
            assert proc.poll() is None, f"`{command}` exited:\n{log.read_text()}"

    @staticmethod
    def _accepts(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    @staticmethod
    def _died(proc: subprocess.Popen[bytes], log: Path) -> bool:
        return proc.poll() is not None

    def python(self, code: str, timeout: float = 120) -> str:
        script = self.cwd / f"block-{abs(hash(code))}.py"
        script.write_text(code)
        try:
            result = run_alone([sys.executable, str(script)], self.cwd, self.env, timeout)
        finally:
            script.unlink()
        assert result.returncode == 0, (f"the block exited {result.returncode}:\n{code}\n"
                                        f"{result.stdout}\n{result.stderr}")
        return result.stdout

    def running(self) -> list[str]:
        return [command for command, proc, _ in self.jobs if proc.poll() is None]

    def close(self) -> None:
        """Stop every background job by its process group (SIGTERM, then SIGKILL)."""
        for _, proc, _ in self.jobs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.jobs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            group_gone(proc.pid)


def run_alone(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a foreground command in its own process group; when it ends, nothing of the group may
    remain (a pool it started must have stopped with it)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{argv} did not finish within {timeout:g}s:\n{out}\n{err}") from None
    finally:
        group_gone(proc.pid, wait=10)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def group_gone(pgid: int, wait: float = 0) -> None:
    """Kill and fail on any process still in the group (after ``wait`` s for it to empty by
    itself): the walk-through left it behind."""

    def empty() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_for(empty, wait, f"process group {pgid} to end")
        return
    except AssertionError:
        pass
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"process group {pgid} still had processes after its leader ended")


def expected_output(code: str) -> Iterator[str]:
    for match in re.finditer(r"#\s*prints:\s*(.+)$", code, re.MULTILINE):
        yield match.group(1).strip()


def pool_leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("runnable-k8s-"))


# ------------------------------------------------------------------ the quickstart (README)

SETUP = re.compile(r"^(python3? -m venv |source |\. |pip install |python3? -m pip install )")


def quickstart_lines() -> list[str]:
    lines = []
    for block in walkthrough(ROOT / "README.md", "quickstart"):
        assert block.language == "bash", "the quickstart is a shell block"
        lines += shell_lines(block.code)
    return lines


def test_the_quickstart_creates_and_activates_a_venv_before_it_installs_or_runs_anything() -> None:
    lines = quickstart_lines()
    kinds = ["venv" if re.match(r"python3? -m venv ", ln)
             else "activate" if re.match(r"(source|\.) \S*bin/activate", ln)
             else "install" if SETUP.match(ln) else "run" for ln in lines]
    assert kinds[:2] == ["venv", "activate"], lines
    assert "install" in kinds and "run" in kinds, lines
    assert kinds.index("install") < kinds.index("run"), lines
    venv = lines[0].split()[-1]
    assert lines[1].endswith(f"{venv}/bin/activate"), "activate the venv the first line made"
    assert any("examples/quickstart.py" in ln for ln in lines if not SETUP.match(ln)), lines


@pytest.mark.timeout(300)
def test_the_quickstart_runs_the_main_job_on_a_local_pool_and_leaves_nothing_behind() -> None:
    """The block's commands after its set-up, from the top of the repository, in this test's venv."""
    tmp = short_temp_dir("rk8s-qs-")
    session = Session(ROOT, venv_environment(tmp))
    try:
        outputs = [session.run_line(line, timeout=240) for line in quickstart_lines() if not SETUP.match(line)]
        printed = "".join(o.stdout for o in outputs)
        assert "invoke" in printed and "stream" in printed, printed
        assert re.search(r"tasks done [1-9]\d*, failed 0", printed), printed
        assert pool_leftovers(tmp) == [], "the local pool left its folder behind"
    finally:
        session.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("RUNNABLE_K8S_WALKTHROUGH_INSTALL") != "1",
                    reason="installs from the network into a fresh venv: set RUNNABLE_K8S_WALKTHROUGH_INSTALL=1")
def test_the_quickstart_verbatim_on_a_fresh_copy_of_the_repository() -> None:
    """What a newcomer does on a fresh machine: the block as written, venv and install included."""
    tmp = short_temp_dir("rk8s-fresh-")
    copy = tmp / "repo"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RUNNABLE_K8S_POOL")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    env["TMPDIR"] = str(tmp)
    script = "set -e\n" + "\n".join(quickstart_lines()) + "\n"
    try:
        result = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                                timeout=1700, start_new_session=True)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert re.search(r"tasks done [1-9]\d*, failed 0", result.stdout), result.stdout
        assert pool_leftovers(tmp) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ the security walk-through

def security_blocks(port: int) -> list[Block]:
    blocks = walkthrough(ROOT / "docs" / "security.md", "security")
    assert any(DOC_PORT in b.code for b in blocks), f"the walk-through no longer uses {DOC_PORT}"
    return [Block(b.language, b.code.replace(DOC_PORT, f"127.0.0.1:{port}")) for b in blocks]


@pytest.mark.timeout(300)
def test_the_security_walkthrough_keys_a_pool_admits_the_client_key_and_refuses_a_call_without() -> None:
    port = free_port()
    blocks = security_blocks(port)
    assert [b.language for b in blocks].count("python") >= 2, "a call with the key and one without"
    tmp = short_temp_dir("rk8s-sec-")
    work = tmp / "walk"
    work.mkdir()
    session = Session(work, venv_environment(tmp))
    printed = []
    try:
        for block in blocks:
            if block.language == "bash":
                for line in shell_lines(block.code):
                    session.run_line(line)
            else:
                assert block.language == "python", block.language
                output = session.python(block.code)
                for expected in expected_output(block.code):
                    assert expected in output, f"expected {expected!r} in the output of:\n{block.code}\ngot {output!r}"
                printed.append(output)
        # Both calls went through the keyed broker and worker of the walk-through, still running.
        assert len(session.running()) == 2, session.running()
        assert (work / "keys" / "broker" / "clients" / "web.key").is_file()
        assert printed[0].strip() == "42"
        assert printed[-1].startswith("refused:")
    finally:
        session.close()
        leftovers = pool_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert leftovers == []
