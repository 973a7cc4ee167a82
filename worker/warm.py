"""The long-lived worker: connects to a broker, runs up to N tasks at once, keeps runnables warm.

The main thread is the I/O thread, in the style of the zguide's ``mdwrkapi.py``: it blocks in one
``zmq.Poller`` on the broker socket and on the queue where task threads and the event loop put
their replies (``worker.replies``), forwards those replies, heartbeats, and keeps each task's
deadline. It never runs user code, so heartbeats keep flowing while a 60 s LLM call is in progress.

Cancel and timeout are answered by the I/O thread at once (``CANCEL`` -> cancelled, deadline ->
timeout), and whatever the task sends later is dropped. On SIGTERM the worker tells the broker it
is draining, finishes what it has within the grace period, says goodbye and exits 0: scaling a
Deployment down loses no task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any

import zmq

from worker import defaults, transport
from worker import protocol as P
from worker.checkpointers import SharedCheckpointer, environment_value
from worker.curve import PeerKeys
from worker.health import HealthFiles
from worker.memory_limit import memory_limit
from worker.replies import ReplyQueue
from worker.tasks import CachedRunnable, Job, RunnableCache, TaskRunner

log = logging.getLogger("runnable_k8s.worker")

RECONNECT_DELAY = 1.0
# On the way out, how long the last messages (BYE, lost tasks) may take to reach the broker.
FAREWELL_LINGER_MS = 1000

__all__ = ["CachedRunnable", "RunnableCache", "WarmWorker"]


class Deadlines:
    """Task deadlines, soonest first.

    A finished task's entry is dropped from the live set at once and from the heap when it comes
    up, or when stale entries outnumber live ones (then the heap is rebuilt). Before, finished
    tasks' entries stayed until their deadline passed: with a 120 s timeout at 1,000 calls/s a
    worker held 120,000 of them (the soak benchmark found it as RSS growth)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, bytes]] = []
        self._live: dict[bytes, int] = {}  # task id -> the order number of its current entry
        self._order = itertools.count()

    def add(self, deadline: float, task_id: bytes) -> None:
        order = next(self._order)
        self._live[task_id] = order
        heapq.heappush(self._heap, (deadline, order, task_id))

    def discard(self, task_id: bytes) -> None:
        if self._live.pop(task_id, None) is not None and len(self._heap) > 2 * len(self._live) + 1024:
            live = self._live
            self._heap = [entry for entry in self._heap if live.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    def _drop_stale(self) -> None:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)

    def next(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float) -> list[bytes]:
        gone = []
        self._drop_stale()
        while self._heap and self._heap[0][0] <= now:
            task_id = heapq.heappop(self._heap)[2]
            del self._live[task_id]
            gone.append(task_id)
            self._drop_stale()
        return gone

    def __len__(self) -> int:
        return len(self._heap)

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()


class WarmWorker:
    def __init__(
        self,
        address: str,
        *,
        slots: int = defaults.WORKER_CONCURRENCY,
        threads: int = defaults.WORKER_THREADS,
        cache_size: int = defaults.WORKER_CACHE_SIZE,
        grace_period: float = defaults.WORKER_GRACE_PERIOD,
        keys: PeerKeys | None = None,
        exit_with_parent: int | None = None,
        health_dir: str | None = None,
        insecure: bool = False,
        concurrency: int | None = None,
        checkpointer: str | None = None,
    ) -> None:
        """``slots``: tasks this worker runs at once, the slots the broker sees (``concurrency`` is
        its old name, still accepted with a DeprecationWarning). ``checkpointer``: a factory's
        import path (``package.module:factory``) whose LangGraph checkpointer replaces each loaded
        graph's own, so a thread can resume on any worker (``worker.checkpointers``); built here,
        and a CheckpointerError (a ValueError) when it cannot be."""
        if concurrency is not None:
            import warnings

            warnings.warn("WarmWorker(concurrency=...) is deprecated; use slots=", DeprecationWarning, stacklevel=2)
            slots = concurrency
        # Plaintext only to this machine unless told otherwise
        # (docs/design.md#trust-one-pool-is-one-trust-domain): checked before any socket.
        refusal = transport.plaintext_refusal(address, keys, insecure, "this worker", "--insecure")
        if refusal is not None:
            raise ValueError(refusal)
        if slots < 1 or threads < 1:
            raise ValueError("--slots and --threads must be 1 or more")
        self.address = address
        self.slots = slots
        self.grace_period = grace_period
        self.keys = keys
        self.exit_with_parent = exit_with_parent
        self.health = HealthFiles(health_dir)
        self.cache = RunnableCache(cache_size)
        self.jobs: dict[bytes, Job] = {}
        self.deadlines = Deadlines()
        self.draining_since: float | None = None
        # Draining ends only once the broker has surely stopped sending tasks: see _fence.
        self._fenced = False
        self._ready_sent_at: float | None = None  # a READY the broker has not answered yet
        self._welcomed = False  # a broker has answered once: a silence later is a lost broker, not a wrong address
        self._unanswered_sessions = 0
        self.exit_code: int | None = None
        self._drain_requested = False
        self._parent_gone = False  # noticed once by _check_parent
        self._broker_context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._replies = ReplyQueue()
        # Whether the broker of this session reads REPLIES (its WELCOME says so), and the most
        # bytes one REPLIES may pack (below the broker's message limit).
        self._pack_replies = False
        self._pack_limit = P.MAX_PACK_BYTES
        # No more threads than slots: a worker never has more sync tasks than it has slots.
        self.runner = TaskRunner(min(threads, slots), self.cache, self._replies)
        self.checkpointer: SharedCheckpointer | None = None
        if checkpointer:
            try:
                self.checkpointer = SharedCheckpointer.start(checkpointer, self.runner.run_on_loop)
            except BaseException:
                self._broker_context.term()
                raise
            self.runner.checkpointer = self.checkpointer
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until drained (0) or refused by the broker (2). Call from the main thread to
        get SIGTERM/SIGINT handling. Task threads are daemons and are not joined."""
        restore = self._install_signal_handlers()
        try:
            while self.exit_code is None:
                self._session()
                if self.exit_code is None:
                    self._idle(RECONNECT_DELAY)
        finally:
            self.health.ready(False)
            for job in self.jobs.values():
                self.runner.abandon(job)
            self.jobs.clear()
            if self._socket is not None:
                self._socket.close(linger=0)
            self._replies.close()
            if self.checkpointer is not None:
                self.checkpointer.close(self.runner.run_on_loop)
            restore()
            self._broker_context.term()
        return self.exit_code

    def drain(self) -> None:
        """Stop taking tasks; finish running ones within the grace period, then exit 0."""
        if self.draining_since is None:
            log.info("draining: %d tasks running, grace period %.0fs", len(self.jobs), self.grace_period)
            self.draining_since = time.monotonic()
            self.health.ready(False)
            self._send([P.PROTOCOL, P.DRAINING])
            self._hand_back_unstarted()
            self._fence()

    def _hand_back_unstarted(self) -> None:
        """Sync tasks still waiting for a thread go back to the broker for another worker, rather
        than keep this one alive (or be cut off at the end of its grace period)."""
        withdrawn = [task_id for task_id, job in self.jobs.items() if self.runner.withdraw(job)]
        for task_id in withdrawn:
            del self.jobs[task_id]
            self.deadlines.discard(task_id)
            self._send(P.error_frames(task_id, P.E_REQUEUE, "worker is draining"))
        if withdrawn:
            log.info("draining: handed %d unstarted tasks back to the broker", len(withdrawn))

    def _fence(self) -> None:
        """Ask the broker something right after DRAINING: it answers in order, so once its answer
        is here, every task it sent before it saw DRAINING is here too (and was requeued). Without
        this, a task already on the wire when the worker says BYE would be lost."""
        self._fenced = False
        self._send([P.PROTOCOL, P.STATUS])

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: Any) -> None:
            self._drain_requested = True  # the byte set_wakeup_fd writes wakes the poller

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _idle(self, seconds: float) -> None:
        """Wait between sessions, still noticing signals and dropping stale task replies."""
        poller = zmq.Poller()
        poller.register(self._replies.fileno(), zmq.POLLIN)
        poller.register(self._wakeup_r, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._drain_requested:
            poller.poll(int(min(left, 1.0) * 1000) + 1)
            self._forward_replies()
            self.health.alive()

    def _session(self) -> None:
        """One connection to the broker, until it is lost or the worker is done."""
        sock = transport.dealer_socket(self._broker_context, self.keys)
        sock.connect(self.address)
        self._socket = sock
        self._pack_replies = False  # until this session's broker says it reads them
        self._register()
        if self.draining_since is not None:
            self._send([P.PROTOCOL, P.DRAINING])
            self._fence()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        replies_fd = self._replies.fileno()
        poller.register(replies_fd, zmq.POLLIN)
        poller.register(self._wakeup_r, zmq.POLLIN)
        broker_expiry = time.monotonic() + P.HEARTBEAT_EXPIRY
        next_heartbeat = time.monotonic() + P.HEARTBEAT_INTERVAL
        try:
            while self.exit_code is None:
                wake_at = next_heartbeat
                soonest = self.deadlines.next()
                if soonest is not None and soonest < wake_at:
                    wake_at = soonest
                self.runner.release()  # last thing before sleeping: see TaskRunner.release
                events = dict(poller.poll(max(0, int((wake_at - time.monotonic()) * 1000)) + 1))
                if sock in events and self._receive(sock):
                    broker_expiry = time.monotonic() + P.HEARTBEAT_EXPIRY
                if replies_fd in events:
                    self._forward_replies()
                if self._wakeup_r in events:
                    self._read_wakeups()
                now = time.monotonic()
                self.health.alive()
                if self.deadlines.next() is not None:
                    self._expire(now)
                if now >= next_heartbeat:
                    self._send([P.PROTOCOL, P.HEARTBEAT])
                    next_heartbeat = now + P.HEARTBEAT_INTERVAL
                    self._check_parent()
                if self._drain_requested:
                    self.drain()
                if self.draining_since is not None:
                    self._check_drained(now)
                if now > broker_expiry and self.exit_code is None:
                    self._log_silence()
                    self.health.ready(False)
                    self._abandon_all()  # their clients were told by the broker (or lost it too)
                    return
        finally:
            sock.close(linger=0 if self.exit_code is None else FAREWELL_LINGER_MS)
            self._socket = None

    def _log_silence(self) -> None:
        """Say why no broker answers. A worker that was never welcomed most likely has a wrong
        address, no broker behind it yet, or keys the broker does not accept (a CurveZMQ
        handshake it refuses looks like silence): say what to check, not that it was lost."""
        if self._welcomed:
            log.warning("lost the broker at %s; reconnecting", self.address)
            return
        self._unanswered_sessions += 1
        if self._unanswered_sessions == 1:
            log.warning(
                "could not reach the broker at %s: nothing answered within %.0fs. Check that a broker runs "
                "there (runnable-k8s broker, or the chart's broker Pod), that the address and port are right "
                "and reachable from here, and that %s; retrying every few seconds",
                self.address, P.HEARTBEAT_EXPIRY,
                "this worker's keys (--keys DIR/worker) are the ones the broker allows" if self.keys
                else "the broker does not expect keys (it was started without --keys)")
        else:
            log.warning("still could not reach the broker at %s (%d tries); retrying",
                        self.address, self._unanswered_sessions)

    @property
    def concurrency(self) -> int:
        """The old name of ``slots``."""
        return self.slots

    def _read_wakeups(self) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def _check_drained(self, now: float) -> None:
        assert self.draining_since is not None, "only called once draining started"
        waited = now - self.draining_since
        if self.jobs and waited < self.grace_period:
            return
        if not self._fenced and waited < P.HEARTBEAT_EXPIRY:
            return
        for task_id, job in list(self.jobs.items()):
            log.warning("grace period over: stopping task %s", task_id.hex()[:8])
            self.runner.abandon(job)
            self._send(P.error_frames(task_id, P.E_WORKER_LOST, (
                f"the worker was stopped and the task did not finish within its {self.grace_period:.0f}s "
                "grace period; raise terminationGracePeriodSeconds / --grace-period for long tasks"
            )))
        self.jobs.clear()
        self._send([P.PROTOCOL, P.BYE])
        self.exit_code = 0

    def _check_parent(self) -> None:
        """Exit (draining with no grace period) once the process that started this worker is gone.
        Said once: draining without a broker to answer the fence takes a few heartbeats."""
        if self.exit_with_parent is not None and not self._parent_gone and os.getppid() != self.exit_with_parent:
            self._parent_gone = True
            log.warning("parent process %d is gone; exiting", self.exit_with_parent)
            self.grace_period = 0.0
            self._drain_requested = True

    def _register(self, again: bool = False) -> None:
        """Say READY. A broker that restarted answers *every* message it gets from this worker
        with RECONNECT until the worker is registered again (heartbeats, replies of the old
        broker's tasks queued meanwhile): answered one by one, those became a burst of READYs,
        and each READY after the first made the broker drop this worker as re-registered and fail
        the tasks it had just given it. So while a READY is unanswered, RECONNECTs are ignored
        for one heartbeat interval."""
        now = time.monotonic()
        if again and self._ready_sent_at is not None and now - self._ready_sent_at < P.HEARTBEAT_INTERVAL:
            return
        self._ready_sent_at = now
        self._send([P.PROTOCOL, P.READY, P.encode_json(self._environment())])

    def _environment(self) -> dict[str, Any]:
        # "concurrency" is the READY field's name in the wire protocol: the slots this worker offers.
        # "checkpointer": "shared" when graphs here keep their threads in a store every worker
        # reaches: the broker may then send a thread's next call to any worker.
        environment = {**P.environment(), "pid": os.getpid(), "concurrency": self.slots,
                       "cache_size": self.cache.max_items, **environment_value(self.checkpointer)}
        limit = memory_limit()
        if limit is not None:  # the broker keeps the inputs it sends here within a share of it
            environment["memory_limit"] = limit
        return environment

    # ------------------------------------------------------------------ messages

    def _send(self, frames: list[bytes]) -> None:
        if self._socket is not None:
            try:
                transport.send_frames(self._socket, frames)
            except zmq.Again:
                log.debug("could not send %s: not connected", P.COMMAND_NAMES.get(frames[1]))

    def _receive(self, sock: zmq.Socket) -> bool:
        """Handle what the broker sent; True if it sent anything."""
        got = False
        for _ in range(1000):
            try:
                frames = transport.recv_frames(sock)
            except zmq.Again:
                break
            got = True
            self._handle(frames)
        return got

    def _forward_replies(self) -> None:
        """Pass task threads' frames to the broker, unless their task was given up meanwhile.

        Everything one ``take`` returns is what was ready when this thread woke: with a broker
        that said ``"replies": true`` its CHUNK/EVENT/RESULT replies travel packed in as few
        REPLIES messages as fit (``worker.protocol``: a message costs each hop far more than a
        token), in order; anything else (an ERROR) first sends the pack so far. Nothing waits for
        company, so packing adds no latency: a reply that is alone when the thread wakes goes alone."""
        taken = self._replies.take(1000)
        if not taken:
            return
        jobs = self.jobs
        if not self._pack_replies:
            for frames in taken:
                task_id = frames[2]
                if frames[1] == P.CHUNK or frames[1] == P.EVENT:
                    if task_id in jobs:
                        self._send(frames)
                elif jobs.pop(task_id, None) is not None:
                    self.deadlines.discard(task_id)
                    self._send(frames)
            return
        parts: list[bytes] = []  # the pack so far: entry header, payload, entry header, ...
        entries = 0
        size = 0
        limit = self._pack_limit
        alone = P.PACK_ALONE_BYTES
        entry = P.reply_entry
        overhead = P.REPLY_ENTRY_HEADER_BYTES
        for frames in taken:
            command, task_id = frames[1], frames[2]
            if command == P.CHUNK or command == P.EVENT:
                if task_id not in jobs:
                    continue
            elif jobs.pop(task_id, None) is not None:
                self.deadlines.discard(task_id)
            else:
                continue
            if command == P.ERROR or len(frames) != 4 or len(frames[3]) >= alone:
                if entries:  # keep the order: what came before goes first
                    self._send_pack(parts, entries)
                    parts, entries, size = [], 0, 0
                self._send(frames)
                continue
            payload = frames[3]
            grown = size + overhead + len(payload)
            if entries and grown > limit:
                self._send_pack(parts, entries)
                parts, entries, grown = [], 0, overhead + len(payload)
            parts.append(entry(command, task_id, payload))
            parts.append(payload)
            entries += 1
            size = grown
        if entries:
            self._send_pack(parts, entries)

    def _send_pack(self, parts: list[bytes], entries: int) -> None:
        """One REPLIES message of the packed entries, or the classic message for a lone one
        (understood by every broker, and one frame copy fewer)."""
        if entries == 1:
            command = parts[0][:1]
            self._send([P.PROTOCOL, command, parts[0][1:1 + P.TASK_ID_BYTES], parts[1]])
        else:
            self._send([P.PROTOCOL, P.REPLIES, b"".join(parts)])

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[0] != P.PROTOCOL:
            log.warning("ignored a malformed message from the broker")
            return
        command, body = frames[1], frames[2:]
        if command == P.TASK and len(body) == 4:
            self._start_task(*body)
        elif command == P.CANCEL and body:
            self._give_up(body[0], P.E_CANCELLED, "cancelled")
        elif command == P.RECONNECT:
            self._register(again=True)
        elif command == P.WELCOME and body:
            self._ready_sent_at = None
            info = P.decode_json_object(body[0])
            self.runner.max_message_bytes = int(info.get("max_message_bytes", self.runner.max_message_bytes))
            # Pack replies only for a broker that says it reads REPLIES (an older one would drop them).
            self._pack_replies = info.get("replies") is True
            self._pack_limit = max(1, min(P.MAX_PACK_BYTES, self.runner.max_message_bytes - 64))
            log.info("connected to broker %s", self.address)
            self._welcomed = True
            self.health.ready(self.draining_since is None)
        elif command == P.STATUS:
            self._fenced = True
        elif command == P.ERROR and len(body) >= 3 and not body[0]:
            log.error("the broker refused this worker: %s", body[2].decode(errors="replace"))
            self.exit_code = 2
        elif command != P.HEARTBEAT:
            log.warning("ignored an unexpected %s from the broker", P.COMMAND_NAMES.get(command, command))

    def _start_task(self, task_id: bytes, header_bytes: bytes, blob: bytes, input_blob: bytes) -> None:
        if self.draining_since is not None:
            self._send(P.error_frames(task_id, P.E_REQUEUE, "worker is draining"))
            return
        try:
            header = P.TaskHeader.from_bytes(header_bytes)
        except ValueError as exc:
            self._send(P.error_frames(task_id, P.E_BAD_REQUEST, str(exc)))
            return
        cached = self.cache.get(header.digest)
        if cached is None and not blob:
            # The broker sends a runnable's bytes once per worker, so the other first calls of a
            # runnable arrive without them: they take the bytes of the task that brought them (its
            # build may not have started yet), and the cache builds once for all of them.
            blob = self._bytes_of(header.digest)
            if not blob and not self.cache.loading(header.digest):
                self._send(P.error_frames(task_id, P.E_NEED_RUNNABLE, "runnable not in this worker's cache"))
                return
        job = Job(task_id, header, blob, input_blob, cached)
        self.jobs[task_id] = job
        if header.timeout is not None:
            self.deadlines.add(time.monotonic() + header.timeout, task_id)
        self.runner.start(job)

    def _bytes_of(self, digest: str) -> bytes:
        """The runnable bytes of ``digest`` that a task here still holds (until its build is over),
        or b"". Only asked for a task that came without them and is not cached: rare."""
        for job in self.jobs.values():
            if job.blob and job.header.digest == digest:
                return job.blob
        return b""

    def _expire(self, now: float) -> None:
        for task_id in self.deadlines.expired(now):
            job = self.jobs.get(task_id)
            if job is not None:
                self._give_up(task_id, P.E_TIMEOUT, (
                    f"the task ran longer than its timeout of {job.header.timeout:.3g}s and was stopped"
                ))

    def _give_up(self, task_id: bytes, code: bytes, message: str) -> None:
        """Answer for a task now (cancelled, timed out) and drop whatever it sends later."""
        job = self.jobs.pop(task_id, None)
        if job is not None:
            self.deadlines.discard(task_id)
            self.runner.abandon(job)
            self._send(P.error_frames(task_id, code, message))

    def _abandon_all(self) -> None:
        for job in self.jobs.values():
            self.runner.abandon(job)
        self.jobs.clear()
        self.deadlines.clear()
