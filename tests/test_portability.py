"""The warm path where ``os.eventfd`` does not exist (macOS, the BSDs): a real LocalPool whose
broker and worker processes run without it, and this process too.

Linux-only calls must degrade, not break: here the one the warm path used to need (the eventfd
that wakes a worker's I/O thread, ``worker.replies``) is removed from ``os`` in every process by a
``sitecustomize`` module on ``PYTHONPATH``, as on a system that never had it, and every way of
calling still works; the worker says which wake-up it used. The bench's machine and process
figures, read from ``/proc`` on Linux, are checked where ``/proc`` is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.runnables import RunnableGenerator

from pool import LocalPool
from pool.bench import machine
from tests.support.remote import remote
from worker.replies import ReplyQueue

pytestmark = pytest.mark.timeout(90)

NO_EVENTFD = textwrap.dedent('''
    """Test-only: make this interpreter look like one on macOS or a BSD: no os.eventfd, and no
    socket.TCP_INFO (the broker's count of the bytes a tcp connection received)."""
    import os
    import socket

    for _name in [n for n in dir(os) if n == "eventfd" or n.startswith(("eventfd_", "EFD_"))]:
        delattr(os, _name)
    if hasattr(socket, "TCP_INFO"):
        del socket.TCP_INFO
''')


def _remove_eventfd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in dir(os) if n == "eventfd" or n.startswith(("eventfd_", "EFD_"))]:
        monkeypatch.delattr(os, name)


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def pool_without_eventfd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A LocalPool whose broker and worker have neither os.eventfd nor socket.TCP_INFO: on its
    default ipc socket, and on tcp with CurveZMQ keys (the broker's connection guard then sees tcp
    connections whose received bytes it cannot count, as on macOS). Yields ``remote(fn)``."""
    site = tmp_path_factory.mktemp("no-eventfd")
    (site / "sitecustomize.py").write_text(NO_EVENTFD)
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    with LocalPool(workers=1, env={"PYTHONPATH": path}, port=0 if request.param == "tcp" else None) as pool:
        assert pool.transport == ("curve" if request.param == "tcp" else "ipc")
        yield lambda fn: remote(pool, fn, keys=pool.keys_dir)


def what_the_worker_has(_: Any) -> dict[str, Any]:
    """From inside the worker process: whether it has os.eventfd, and its reply queue's wake-up."""
    import gc as gc_module
    import os as os_module
    import stat as stat_module

    queues = [o for o in gc_module.get_objects() if type(o).__name__ == "ReplyQueue" and o.fileno() >= 0]
    return {
        "has_eventfd": hasattr(os_module, "eventfd"),
        "has_tcp_info": hasattr(__import__("socket"), "TCP_INFO"),
        "kinds": [q.kind for q in queues],
        "fifo": [stat_module.S_ISFIFO(os_module.fstat(q.fileno()).st_mode) for q in queues],
    }


def test_the_worker_runs_without_eventfd_and_wakes_through_a_pipe(pool_without_eventfd):
    seen = pool_without_eventfd(what_the_worker_has).invoke(None)
    assert seen == {"has_eventfd": False, "has_tcp_info": False, "kinds": ["pipe"], "fifo": [True]}


def test_invoke_batch_stream_and_ainvoke_without_eventfd(pool_without_eventfd, monkeypatch):
    _remove_eventfd(monkeypatch)  # the client side too: nothing in it may need eventfd
    assert not hasattr(os, "eventfd")
    factor = 3
    assert pool_without_eventfd(lambda x: x * factor).invoke(14) == 42
    assert pool_without_eventfd(lambda x: x + 1).batch(list(range(20))) == list(range(1, 21))

    def tokens(chunks: Iterator[str]) -> Iterator[str]:
        for text in chunks:
            for word in text.split():
                yield word + " "

    streamed = list(pool_without_eventfd(RunnableGenerator(tokens)).stream("one two three four five"))
    assert "".join(streamed) == "one two three four five "
    assert len(streamed) >= 2  # streamed as it came, not one final chunk

    async def concurrent() -> list[int]:
        runnable = pool_without_eventfd(lambda x: x * 2)
        return list(await asyncio.gather(*(runnable.ainvoke(i) for i in range(8))))

    assert asyncio.run(concurrent()) == [i * 2 for i in range(8)]


def test_a_reply_queue_made_without_eventfd_falls_back_to_a_pipe(monkeypatch):
    _remove_eventfd(monkeypatch)
    queue = ReplyQueue()
    try:
        assert queue.kind == "pipe"
        assert stat.S_ISFIFO(os.fstat(queue.fileno()).st_mode)
        with pytest.raises(OSError, match="Linux-only"):
            ReplyQueue(use_eventfd=True)
    finally:
        queue.close()


# ---------------------------------------------------------------------------- the bench without /proc
# macOS has no /proc: the bench's machine and process figures then come from psutil or the system's
# tools. Here /proc is pointed at a folder that does not exist, and the figures must match /proc's.

NO_PROC = "/nonexistent-proc"
HOLD_FDS = "import os, sys; fds = [os.pipe() for _ in range(8)]; print('ready', flush=True); sys.stdin.read()"


@pytest.fixture
def quiet_child() -> Iterator[int]:
    """A Python process holding 16 extra descriptors and doing nothing else until its stdin closes."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_FDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        yield child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        child.stdout.close()  # type: ignore[union-attr]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="compares against Linux's /proc")
def test_process_figures_without_proc_match_procs(quiet_child):
    by_proc = machine.open_fds(quiet_child)
    assert by_proc is not None and by_proc >= 16 + 3
    if machine._psutil() is None and shutil.which("lsof") is None:
        assert machine.open_fds(quiet_child, proc=NO_PROC) is None  # unknown, not a failure
    else:
        assert machine.open_fds(quiet_child, proc=NO_PROC) == by_proc
    rss, rss_elsewhere = machine.rss_kb(quiet_child), machine.rss_kb(quiet_child, proc=NO_PROC)
    assert rss is not None and rss > 0
    if machine._psutil() is None and shutil.which("ps") is None:
        assert rss_elsewhere is None
    else:
        assert rss_elsewhere is not None and abs(rss_elsewhere - rss) <= rss // 10


def test_process_figures_of_a_process_that_is_gone_are_unknown():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    for proc in (machine.PROC, NO_PROC):
        assert machine.rss_kb(child.pid, proc=proc) is None
        assert machine.open_fds(child.pid, proc=proc) is None


def test_machine_figures_without_proc():
    model = machine.cpu_model(proc=NO_PROC)
    assert isinstance(model, str) and model
    memory = machine.memory_gb(proc=NO_PROC)
    assert memory is not None and memory > 0
    if os.path.exists("/proc/meminfo"):
        assert abs(memory - (machine.memory_gb() or 0)) <= 0.1


def test_a_worker_without_cgroup_files_reports_no_memory_limit(tmp_path):
    # macOS (and a Linux without cgroups mounted) has no memory.max: the worker then says "no
    # limit" in READY instead of failing; the file, where present, is read.
    from worker.warm import memory_limit

    missing = (str(tmp_path / "cgroup-v2" / "memory.max"), str(tmp_path / "cgroup-v1" / "memory.limit_in_bytes"))
    assert memory_limit(missing) is None
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert memory_limit((*missing, str(tmp_path / "memory.max"))) == 1 << 30
