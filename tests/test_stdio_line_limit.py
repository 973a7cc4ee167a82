"""Ephemeral mode's stdio lines have a length cap on both ends (worker/stdio_lines.py).

The client reads the one-shot worker's stdout, and the worker reads its stdin, a line at a time.
Without a cap, a peer that never sends a newline (a broken image, a program that is not our
worker) made the reader keep everything in memory. Each hostile test below counts the bytes the
hostile side managed to hand over: with the cap, the reader stops near ``MAX_LINE_BYTES``; without
it, it takes all ``FLOOD`` bytes. Real processes and pipes throughout.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

from pool import WorkerLineTooLong
from pool.client.calls import RemoteCall, encode_input, encode_runnable
from pool.ephemeral.local_launcher import READ_BYTES, ProcessChannel
from pool.ephemeral.session import EphemeralBackend
from pool.errors import PayloadTooLarge, ProtocolError
from tests.support.paths import REPO
from tests.support.processes import child_pids, is_gone
from worker import defaults
from worker import protocol as P
from worker.stdio_lines import MAX_LINE_BYTES

MiB = 1024 * 1024
FLOOD = MAX_LINE_BYTES + 32 * MiB  # what a hostile side offers at most (so a reader without a cap ends too)
SLACK = READ_BYTES + 4 * MiB  # one read, the pipe's buffer, one write in flight: what a capped reader may take

# A one-shot "worker" that floods its stdout and records how much the pipe took (its writes block
# once the client stops reading; the client then kills it).
FLOODING_WORKER = """
import os, sys
count_file, prefix, newline_every = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
chunk = b"x" * (1 << 20)
written = 0
fd = os.open(count_file, os.O_WRONLY | os.O_CREAT)
os.write(1, prefix)
while written < {flood}:
    written += os.write(1, chunk)
    if newline_every and written >= newline_every:
        os.write(1, b"\\n")
        newline_every = 0
    os.pwrite(fd, str(written).rjust(20).encode(), 0)
""".replace("{flood}", str(FLOOD))


class FloodingLauncher:
    """Starts FLOODING_WORKER instead of ``python -m worker --stdio``."""

    def __init__(self, count_file: Path, prefix: bytes = b"", newline_after: int = 0) -> None:
        self.count_file = count_file
        self.args = [prefix.decode(), str(newline_after)]
        self.pids: list[int] = []

    def launch(self, deadline: float | None) -> ProcessChannel:
        proc = subprocess.Popen([sys.executable, "-c", FLOODING_WORKER, str(self.count_file), *self.args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pids.append(proc.pid)
        return ProcessChannel(proc, deadline)


def _call() -> RemoteCall:
    blob, digest = encode_runnable(RunnableLambda(lambda x: x))
    return RemoteCall(blob, digest, encode_input(1, {}), timeout=120)


def _written(count_file: Path) -> int:
    return int(count_file.read_text() or 0)


# ---------------------------------------------------------------------------- the cap itself


@pytest.mark.timeout(60)
def test_the_cap_holds_the_largest_honest_lines_and_is_one_number():
    # A TASK whose runnable and input come to the largest message, and a RESULT of that size: what
    # an honest peer may send. One call of stdio_line each, as the session and the worker build them.
    header = P.TaskHeader("invoke", "d" * 64, 600.0, 0, {"tags": ["t"] * 100, "metadata": {"k": "v" * 10_000}},
                          False).to_bytes()
    half = defaults.MAX_MESSAGE_BYTES // 2
    blob = bytes(half)
    assert len(P.stdio_line(P.TASK, header, blob, blob)) <= MAX_LINE_BYTES
    assert len(P.stdio_line(P.RESULT, bytes(defaults.MAX_MESSAGE_BYTES))) <= MAX_LINE_BYTES
    # and it is not far above: base64 of the largest message plus a little
    assert len(base64.b64encode(bytes(defaults.MAX_MESSAGE_BYTES))) + 2 * MiB > MAX_LINE_BYTES


# ---------------------------------------------------------------------------- the client's reader


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["endless line without a newline", "huge line that looks like a RESULT"])
def test_a_worker_that_floods_stdout_gets_a_typed_error_bounded_reads_and_is_stopped(tmp_path, shape):
    count_file = tmp_path / "written"
    count_file.write_text("0")
    if shape.startswith("endless"):
        launcher = FloodingLauncher(count_file)
    else:  # a well-formed start, then a newline only after MAX_LINE_BYTES + 8 MiB
        launcher = FloodingLauncher(count_file, prefix=P.PROTOCOL + b" RESULT ", newline_after=MAX_LINE_BYTES + 8 * MiB)
    before = child_pids()
    with pytest.raises(WorkerLineTooLong) as info:
        EphemeralBackend(launcher).invoke(_call())
    assert isinstance(info.value, ProtocolError)
    message = str(info.value)
    assert f"longer than {MAX_LINE_BYTES} bytes" in message and "python -m worker --stdio" in message
    assert launcher.pids and all(is_gone(pid) for pid in launcher.pids)  # the worker was stopped
    assert child_pids() <= before
    written = _written(count_file)
    # (the count lags the pipe by the write the kill interrupted)
    assert MAX_LINE_BYTES - 2 * MiB <= written <= MAX_LINE_BYTES + SLACK, written  # no more was read


# A "worker" that writes an endless stderr line, then exits without a result.
STDERR_FLOODER = """
import os
chunk = b"e" * (1 << 20)
for _ in range({chunks}):
    os.write(2, chunk)
""".replace("{chunks}", str(FLOOD // MiB))


class StderrFloodingLauncher:
    def launch(self, deadline: float | None) -> ProcessChannel:
        proc = subprocess.Popen([sys.executable, "-c", STDERR_FLOODER],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return ProcessChannel(proc, deadline)


@pytest.mark.timeout(120)
def test_an_endless_stderr_line_keeps_only_a_tail_in_the_clients_error():
    # The stderr reader kept whole lines: a worker that never ends one filled the client's memory,
    # and the WorkerLost message then carried all of it.
    from pool.ephemeral.local_launcher import STDERR_TAIL_BYTES
    from pool.errors import WorkerLost

    before = child_pids()
    with pytest.raises(WorkerLost) as info:
        EphemeralBackend(StderrFloodingLauncher()).invoke(_call())
    message = str(info.value)
    assert "exited with code 0" in message and message.rstrip().endswith("e" * 100)
    assert len(message) < STDERR_TAIL_BYTES + 1000
    assert child_pids() <= before


@pytest.mark.timeout(60)
def test_a_task_over_the_line_cap_is_refused_before_any_worker_starts():
    launched: list[float | None] = []

    class Recording:
        def launch(self, deadline: float | None) -> ProcessChannel:
            launched.append(deadline)
            raise AssertionError("no worker should start")

    blob, digest = encode_runnable(RunnableLambda(lambda x: x))
    call = RemoteCall(blob, digest, bytes(defaults.MAX_MESSAGE_BYTES + 2 * MiB), timeout=60)
    with pytest.raises(PayloadTooLarge) as info:
        EphemeralBackend(Recording()).invoke(call)
    assert str(MAX_LINE_BYTES) in str(info.value) and "URL" in str(info.value)
    assert not launched


# ---------------------------------------------------------------------------- the worker's reader


def _flood_worker_stdin(first: bytes, newline_after: int) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """``python -m worker --stdio`` fed ``first`` then a line of FLOOD bytes (a newline after
    ``newline_after`` of them when not 0); returns how it ended and how many bytes it took."""
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--stdio", "--log-level", "WARNING"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    taken = 0
    outputs: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda name=name: outputs.__setitem__(name, getattr(proc, name).read()))
               for name in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    assert proc.stdin is not None
    chunk = b"A" * MiB
    try:
        proc.stdin.write(first)
        proc.stdin.flush()
        while taken < FLOOD:
            proc.stdin.write(chunk)
            proc.stdin.flush()
            taken += len(chunk)
            if newline_after and taken >= newline_after:
                proc.stdin.write(b"\n")
                newline_after = 0
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the worker stopped reading and left
    finally:
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for reader in readers:
                reader.join(10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, outputs.get("stdout", b""),
                                       outputs.get("stderr", b"")), taken


def _error_of(stdout: bytes) -> tuple[bytes, str]:
    for line in stdout.splitlines():
        message = P.parse_stdio_line(line)
        if message is not None and message[0] == P.ERROR:
            return message[1][1], message[1][2].decode()
    raise AssertionError(f"no ERROR line in {stdout[:500]!r}")


@pytest.mark.timeout(120)
def test_a_worker_fed_an_endless_stdin_line_stops_reading_answers_an_error_and_exits():
    started = time.monotonic()
    result, taken = _flood_worker_stdin(b"", 0)
    assert result.returncode == 2, result.stderr[-2000:]
    code, text = _error_of(result.stdout)
    assert code == P.E_PAYLOAD_TOO_LARGE
    assert f"longer than {MAX_LINE_BYTES} bytes" in text and "same runnable-k8s" in text
    assert taken <= MAX_LINE_BYTES + SLACK, taken  # the pipe broke: the worker read no further
    assert time.monotonic() - started < 110


@pytest.mark.timeout(120)
def test_a_worker_fed_a_huge_task_line_after_hello_answers_ready_then_an_error_and_exits():
    hello = P.stdio_line(P.HELLO, P.encode_json(P.environment()))
    result, taken = _flood_worker_stdin(hello + P.PROTOCOL + b" TASK ", MAX_LINE_BYTES + 8 * MiB)
    assert result.returncode == 2, result.stderr[-2000:]
    assert P.parse_stdio_line(result.stdout.splitlines()[0])[0] == P.READY
    code, text = _error_of(result.stdout)
    assert code == P.E_PAYLOAD_TOO_LARGE and f"longer than {MAX_LINE_BYTES} bytes" in text
    assert taken <= MAX_LINE_BYTES + SLACK, taken


# ---------------------------------------------------------------------------- the Pod's attach stream


class EndlessAttachStream:
    """Stands in for the kubernetes client's attach websocket (a third-party object; a real one
    needs a cluster, where tests/test_ephemeral_k8s.py runs): stdout that never ends a line."""

    def __init__(self, prefix: str = "", line: str = "") -> None:
        self.pending = prefix
        self.line = line  # what each update brings (default: a MiB of a line that never ends)
        self.handed = 0
        self.captured = 0  # what the real client also keeps for read_all(), until that is called
        self.most_captured = 0

    def is_open(self) -> bool:
        return True

    def update(self, timeout: float) -> None:
        data = self.line or "x" * MiB
        self.pending += data
        self.captured += len(data)
        self.most_captured = max(self.most_captured, self.captured)

    def read_all(self) -> str:
        self.captured = 0
        return ""

    def peek_stdout(self) -> bool:
        return bool(self.pending)

    def read_stdout(self) -> str:
        data, self.pending = self.pending, ""
        self.handed += len(data)
        return data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prefix", ["", "RK8S/2 RESULT "])
def test_the_pod_channel_stops_reading_an_endless_line_at_the_cap(prefix):
    from pool.ephemeral.k8s_launcher import PodChannel
    from worker.stdio_lines import LineTooLong

    stream = EndlessAttachStream(prefix)
    channel = PodChannel(None, None, "runner-x", stream)  # type: ignore[arg-type]  # never closed here
    with pytest.raises(LineTooLong):
        channel.read_line(30)
    assert MAX_LINE_BYTES <= stream.handed <= MAX_LINE_BYTES + 2 * MiB


@pytest.mark.timeout(60)
def test_the_pod_channel_drops_the_kubernetes_clients_copy_of_what_it_read():
    # The kubernetes client keeps everything an attach stream sent, for read_all(): a worker
    # writing short lines forever (or a long stream of chunks) would fill memory with no line over
    # the cap. The channel drops that copy as it reads.
    from pool.ephemeral.k8s_launcher import PodChannel

    stream = EndlessAttachStream(line="RK8S/2 NOTHING x\n" * 4096)
    channel = PodChannel(None, None, "runner-x", stream)  # type: ignore[arg-type]
    for _ in range(20_000):
        assert channel.read_line(5) == b"RK8S/2 NOTHING x\n"
    assert stream.handed > 100_000 and stream.most_captured <= len(stream.line)
