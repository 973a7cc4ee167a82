"""``LocalPool``: the same broker and worker programs as on a cluster, as local processes.

    with LocalPool(workers=2) as pool:
        RunnableK8s(bound=chain, pool=pool.address).invoke(...)

It is the embedded default for laptops, tests and CI. Every process it starts is stopped when the
block ends, even when the block raises; the children also watch this process and leave by
themselves if it dies without cleaning up.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pool.client.connection import Connection
from pool.errors import PoolUnavailable
from pool.keys import DEFAULT_CLIENT, create_key_directory
from worker import defaults
from worker.curve import load_peer_keys

if TYPE_CHECKING:
    from pool.scaling.policy import AutoscaleSettings

STOP_TIMEOUT = 10.0
# A removed worker may take its whole grace period to finish its tasks; past that (and a margin to
# say goodbye) it is stuck, and is killed.
DRAIN_TIMEOUT = defaults.WORKER_GRACE_PERIOD + STOP_TIMEOUT


class LocalPool:
    """A broker and ``workers`` worker processes on this machine, reachable only by this user.

    Where it listens, and who can get in (docs/design.md#trust-one-pool-is-one-trust-domain):

    * ``LocalPool()``: ``ipc://`` on a socket file in a fresh 0700 temporary directory (removed
      by ``close``). Only this user (and root) can open it; any process of this user can use
      ``address`` as it is, with no keys (``RunnableK8s(pool=pool.address)``). It is the default
      because it needs nothing from the client and was measured no slower than plaintext tcp (a
      2-core machine, 2 workers x 32 slots: warm echo p50 1.7-2.0 ms against 2.3 ms for tcp with
      or without keys; 1,500-1,700 calls/s at 64 in flight against 1,100-1,600).
    * ``LocalPool(port=N)``, or ``secure=True``: ``tcp://127.0.0.1:N`` (0: any free port) with
      CurveZMQ keys made for this pool in a 0700 temporary directory, one folder per role (the
      broker, the workers and one client, ``default``): ``keys_dir`` is that client's folder, what
      clients pass as ``keys=`` (or ``RUNNABLE_K8S_KEYS``); it holds no broker or worker secret.
      A loopback port can be reached by every user of the machine, so it is never open without
      keys unless asked.
    * ``secure=False``: plaintext ``tcp://127.0.0.1`` (``port`` or any free one), as before: any
      local user (and any container sharing the network namespace) can run code on the workers.
      Only for a machine nobody else uses, or a raw plaintext tool that needs tcp.

    Args:
        workers: worker processes to start (``scale`` changes it later).
        slots: tasks each worker runs at once (the slots the broker sees; ``concurrency=`` is its
            old name, still accepted with a DeprecationWarning).
        threads: threads for sync code in each worker (awaiting runnables need none).
        port: listen on ``tcp://127.0.0.1:port`` instead of ipc (0: any free port); with keys
            unless ``secure=False``.
        secure: None (the default) picks as above; True: tcp with CurveZMQ keys; False: plaintext tcp.
        env: extra environment for the workers (API keys, for instance).
        broker_args: extra ``runnable-k8s broker`` options, e.g. ``["--queue-timeout", "5"]``.
        autoscale: run the autoscaling policy on the worker count (``AutoscaleSettings(min=0,
            max=4, window=30, idle=60)``): a thread here reads the broker's status every second
            and scales the processes; ``workers`` is then only the starting count.
    """

    def __init__(
        self,
        workers: int = defaults.LOCAL_WORKERS,
        *,
        slots: int = defaults.WORKER_CONCURRENCY,
        threads: int = defaults.WORKER_THREADS,
        port: int | None = None,
        secure: bool | None = None,
        env: dict[str, str] | None = None,
        broker_args: list[str] | None = None,
        worker_args: list[str] | None = None,
        log_level: str = "WARNING",
        start_timeout: float = 30.0,
        autoscale: AutoscaleSettings | None = None,
        concurrency: int | None = None,
    ) -> None:
        if concurrency is not None:
            import warnings

            warnings.warn("LocalPool(concurrency=...) is deprecated; use slots= (tasks each worker runs at once)",
                          DeprecationWarning, stacklevel=2)
            slots = concurrency
        if workers < 0:
            raise ValueError("workers must be 0 or more")
        self.initial_workers = workers
        self.slots = slots
        self.threads = threads
        self.port = port
        self.secure = secure
        # "ipc": socket file in a 0700 folder; "curve": tcp with keys; "plaintext": tcp without.
        self.transport = "plaintext" if secure is False else "curve" if (secure or port is not None) else "ipc"
        self.env = {**os.environ, **(env or {})}
        self.broker_args = broker_args or []
        self.worker_args = worker_args or []
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.address = ""
        self.keys_dir: str | None = None  # the client's key folder (what a client passes as keys=)
        self._broker_keys_dir: str | None = None
        self._worker_keys_dir: str | None = None
        self._temp_dir: str | None = None
        self._broker: subprocess.Popen[bytes] | None = None
        self._workers: list[subprocess.Popen[bytes]] = []
        self._retired: list[subprocess.Popen[bytes]] = []  # told to stop, still draining
        self._scale_lock = threading.RLock()  # the autoscaler's thread scales too
        self.autoscale = autoscale
        self.autoscaler: Any = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalPool:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> LocalPool:
        try:
            if self.transport != "plaintext":
                self._temp_dir = _private_temp_dir()
            if self.transport == "curve":
                assert self._temp_dir is not None
                tree = create_key_directory(Path(self._temp_dir) / "keys")
                self._broker_keys_dir = str(tree / "broker")
                self._worker_keys_dir = str(tree / "worker")
                self.keys_dir = str(tree / "clients" / DEFAULT_CLIENT)
            self._start_broker()
            self.scale(self.initial_workers)
            if self.autoscale is not None:
                self._start_autoscaler(self.autoscale)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process (workers drain first), then the broker; idempotent."""
        if self.autoscaler is not None:
            self.autoscaler.stop()
            self.autoscaler = None
        if self.address:
            Connection.close_all(self.address)
        with self._scale_lock:
            _stop_all(self._workers + self._retired)
            self._workers = []
            self._retired = []
        if self._broker is not None:
            _stop_all([self._broker])
            if self._broker.stdout is not None:
                self._broker.stdout.close()
            self._broker = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    @property
    def pids(self) -> list[int]:
        """PIDs of the broker and the workers (for tests and troubleshooting)."""
        draining = [p for p in self._retired if p.poll() is None]
        procs = ([self._broker] if self._broker else []) + self._workers + draining
        return [p.pid for p in procs]

    @property
    def concurrency(self) -> int:
        """The old name of ``slots``."""
        return self.slots

    @property
    def workers(self) -> int:
        return len(self._workers)

    # ------------------------------------------------------------------ scaling

    def scale(self, workers: int, wait: bool = True) -> None:
        """Run ``workers`` worker processes. Removed workers drain: they finish their tasks first."""
        if workers < 0:
            raise ValueError("workers must be 0 or more")
        with self._scale_lock:
            self._retired = [p for p in self._retired if p.poll() is None]  # reap the drained ones
            while len(self._workers) > workers:
                proc = self._workers.pop()
                proc.send_signal(signal.SIGTERM)
                if wait:
                    _wait_or_kill(proc, DRAIN_TIMEOUT)
                else:
                    self._retired.append(proc)
            while len(self._workers) < workers:
                self._workers.append(self._spawn_worker())
        if wait:
            self.wait_for_workers(workers)

    def _start_autoscaler(self, settings: AutoscaleSettings) -> None:
        from dataclasses import replace

        from pool.scaling.autoscaler import Autoscaler

        if settings.slots_per_worker is None:
            settings = replace(settings, slots_per_worker=self.slots)
        self.autoscaler = Autoscaler(settings, LocalPoolScaler(self), resync=0).poll(self.status)

    def wait_for_workers(self, count: int, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            for proc in self._workers:
                if proc.poll() is not None:
                    raise PoolUnavailable(f"a local worker exited with code {proc.returncode} while starting; "
                                          "see its log above")
            # Only this pool's own processes count: a worker connected from elsewhere is not one.
            own = {proc.pid for proc in self._workers}
            ready = [w for w in self.status()["workers"] if not w["draining"] and w["pid"] in own]
            if len(ready) >= count:
                return
            if time.monotonic() > deadline:
                raise PoolUnavailable(
                    f"only {len(ready)} of {count} local worker{'' if count == 1 else 's'} registered within "
                    f"{timeout or self.start_timeout:g}s: see the workers' log above; on a slow or busy machine "
                    "pass a longer LocalPool(start_timeout=...)")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return self.connection().status()

    def connection(self) -> Connection:
        keys = load_peer_keys(self.keys_dir, "client") if self.keys_dir else None
        return Connection.shared(self.address, keys)

    # ------------------------------------------------------------------ processes

    def _bind_endpoint(self) -> str:
        if self.transport == "ipc":
            assert self._temp_dir is not None
            return f"ipc://{self._temp_dir}/broker.sock"
        return f"tcp://127.0.0.1:{self.port or '*'}"

    def _start_broker(self) -> None:
        command = [
            sys.executable, "-m", "pool", "broker",
            "--bind", self._bind_endpoint(),
            "--announce", "--exit-with-parent", str(os.getpid()), "--log-level", self.log_level,
            *(["--keys", self._broker_keys_dir] if self._broker_keys_dir else []),
            *(["--insecure"] if self.transport == "plaintext" else []),
            # The broker removes the private folder itself when it stops, so a parent that dies
            # without close() (its children follow it, see --exit-with-parent) leaves nothing behind.
            *(["--remove-on-exit", self._temp_dir] if self._temp_dir else []),
            *self.broker_args,
        ]
        self._broker = subprocess.Popen(command, stdout=subprocess.PIPE, env=self.env)
        line = _read_line(self._broker, self.start_timeout)
        if not line.startswith("READY "):
            raise PoolUnavailable(f"the local broker did not start (it said {line!r}); see its log above")
        self.address = line.split(" ", 1)[1].strip()

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "worker", "--connect", self.address,
            "--slots", str(self.slots), "--threads", str(self.threads),
            "--exit-with-parent", str(os.getpid()),
            "--log-level", self.log_level,
            *(["--keys", self._worker_keys_dir] if self._worker_keys_dir else []),
            *self.worker_args,
        ]
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=self.env)


def _private_temp_dir() -> str:
    """A fresh directory only this user can enter (mkdtemp makes it 0700), for the broker's socket
    file or the pool's keys. An ipc path must fit in a socket address (about 100 bytes): a long
    TMPDIR (macOS's is) falls back to /tmp."""
    base = tempfile.gettempdir()
    if len(base) > 60 and os.path.isdir("/tmp"):
        base = "/tmp"
    path = tempfile.mkdtemp(prefix="runnable-k8s-", dir=base)
    os.chmod(path, 0o700)  # mkdtemp already does; said again because everything rests on it
    return path


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (proc.poll() is not None and not select.select([proc.stdout], [], [], 0)[0]):
            break
        if select.select([proc.stdout], [], [], min(remaining, 0.1))[0]:
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            data += byte
    return data.decode(errors="replace")


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        _wait_or_kill(proc, max(0.1, deadline - time.monotonic()))


class LocalPoolScaler:
    """A LocalPool's worker process count, for the autoscaler. ``scale`` never waits: removed
    workers drain by themselves while the autoscaler goes on."""

    def __init__(self, local_pool: LocalPool) -> None:
        self.pool = local_pool

    def current(self) -> int:
        return self.pool.workers

    def scale(self, replicas: int) -> None:
        self.pool.scale(replicas, wait=False)

    def describe(self) -> str:
        return f"local pool {self.pool.address}"
