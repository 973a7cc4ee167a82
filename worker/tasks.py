"""Where a warm worker's tasks run: one event loop for runnables that await, threads for the rest.

The worker's I/O thread (``worker.warm``) owns the broker socket and never runs user code. It hands
each task to a :class:`TaskRunner`, which runs it

* on one asyncio loop in its own thread, for a runnable that awaits (a chat model, a retriever, a
  LangGraph graph, an ``async def`` part: ``execution.prefers_event_loop``). An LLM call spends
  its time waiting on the network, and on the loop a waiting call costs a coroutine, not a
  thread: hundreds wait at once. Sync parts of such a chain go to the loop's executor, which is
  the same bounded pool of ``threads``;
* on one of ``threads`` task threads, for sync code, each task waking exactly one idle thread
  (``worker.handoff``). A worker takes more tasks
  than it has threads (its ``concurrency``, the slots the broker sees); sync ones wait in the
  queue for a thread, and a draining worker hands those back to the broker unstarted
  (:meth:`TaskRunner.withdraw`).

A batch task (several inputs, ``protocol`` kind "batch") goes to the loop or a thread as an
invoke of the same runnable would, and runs with the runnable's own ``abatch_as_completed`` there
or ``batch_as_completed`` here. On a thread, the batch's items run on one more bounded pool of
``threads`` shared by all batches (``execution.share_batch_threads``), not on a thread pool of
their own per batch as LangChain would start: the worker's bound on threads holds. Each item
goes back as a CHUNK as it finishes (``execution.iterate_batch``); a batch abandoned on the loop
is cancelled with its items' tasks, one on a thread stops before its next item, like a stream.

Either way the task's reply frames (CHUNK, RESULT, ERROR: exactly what the broker will receive)
go back through a :class:`~worker.replies.ReplyQueue` to the I/O thread, which forwards them unless
the task was cancelled or timed out meanwhile. A task thread never touches the broker socket.

A task the I/O thread gives up on (cancelled, timed out, worker draining past its grace period)
is *abandoned*: an async task is cancelled; a sync stream stops before its next chunk; a sync
invoke cannot be interrupted, so its thread runs on to the end and then exits, and a fresh thread
takes its place at once so the worker keeps its full concurrency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from langchain_core.runnables import Runnable

from worker import checkpointers, codec, defaults, execution
from worker import protocol as P
from worker.checkpointers import SharedCheckpointer
from worker.handoff import HandOff, Waiter
from worker.replies import ReplyQueue

log = logging.getLogger("runnable_k8s.worker")

T = TypeVar("T")

# Job states. Changed under TaskRunner._lock: the I/O thread abandons while a task thread starts.
QUEUED, RUNNING, ON_LOOP, DONE, ABANDONED = range(5)


@dataclass
class CachedRunnable:
    runnable: Runnable
    on_loop: bool  # runs on the event loop (``execution.prefers_event_loop``), else on a thread
    # A LangGraph graph that keeps its threads in its own memory (an InMemorySaver): evicting it
    # would lose them silently (the broker still sends their calls here), so it is evicted last.
    keeps_threads: bool = False


class NotCached(LookupError):
    """A task came without the runnable's bytes, and this worker neither holds nor is building it:
    the broker sends the bytes again (``E_NEED_RUNNABLE``)."""


class _Flight:
    """One build under way: its outcome, and how many tasks share it."""

    __slots__ = ("outcome", "tasks")

    def __init__(self) -> None:
        self.outcome: concurrent.futures.Future[CachedRunnable] = concurrent.futures.Future()
        self.tasks = 1


class RunnableCache:
    """Deserialized runnables by digest, so a repeated call reuses the object (and its HTTP pools,
    and a LangGraph graph's in-memory checkpoints: its threads live in that one object).

    Read by the I/O thread, filled by task threads (which deserialize), hence the lock. A runnable
    is built once per worker (:meth:`load`): tasks of a digest that is being built wait for that
    build and share its object. Before, two tasks of a new graph arriving together each built a
    copy, the cache kept the last, and the threads paused in the other copy were lost.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, CachedRunnable] = OrderedDict()
        # Builds under way, by digest: the tasks that need one wait on its future.
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> CachedRunnable | None:
        with self._lock:
            item = self._items.get(digest)
            if item is not None:
                self._items.move_to_end(digest)
            return item

    def loading(self, digest: str) -> int:
        """How many tasks share the build of ``digest`` under way now (the builder and those
        waiting for it; 0: none). A task without the runnable's bytes can wait for that build
        instead of asking the broker for them."""
        with self._lock:
            flight = self._flights.get(digest)
            return flight.tasks if flight is not None else 0

    def put(self, digest: str, item: CachedRunnable) -> None:
        with self._lock:
            self._put(digest, item)

    def _put(self, digest: str, item: CachedRunnable) -> None:
        items = self._items
        items[digest] = item
        items.move_to_end(digest)
        while len(items) > self.max_items:
            # The least recently used runnable that holds no threads; only when every one does,
            # the least recently used of all (said in the log: its threads restart from scratch).
            victim = next((key for key, held in items.items() if not held.keeps_threads), None)
            if victim is None:
                victim = next(iter(items))
                log.warning("the runnable cache (--cache-size %d) is full of graphs that keep their threads in "
                            "memory; one was dropped and its paused threads will start over. Raise --cache-size, "
                            "or give the workers a shared checkpointer (RUNNABLE_K8S_CHECKPOINTER)", self.max_items)
            del items[victim]

    def load(self, digest: str, build: Callable[[], CachedRunnable] | None) -> CachedRunnable:
        """The runnable of ``digest``: the cached one, else the one another thread is building
        (waited for), else the one ``build`` makes here, outside the lock (deserializing can take
        seconds, and the I/O thread reads the cache meanwhile). A build that raises fails every
        task waiting for it with its error and caches nothing: the next task tries again.
        ``build`` None (the task came without the bytes) and nothing cached or building: NotCached."""
        with self._lock:
            item = self._items.get(digest)
            if item is not None:
                self._items.move_to_end(digest)
                return item
            flight = self._flights.get(digest)
            if flight is None:
                if build is None:
                    raise NotCached(digest)
                flight = self._flights[digest] = _Flight()
                building = True
            else:
                flight.tasks += 1
                building = False
        if not building:
            return flight.outcome.result()  # the builder's object, or its exception raised here too
        assert build is not None, "only a task that brought the bytes builds"
        try:
            item = build()
        except BaseException as exc:
            with self._lock:
                del self._flights[digest]
            flight.outcome.set_exception(exc)
            raise
        with self._lock:
            del self._flights[digest]
            self._put(digest, item)
        flight.outcome.set_result(item)
        return item

    def __len__(self) -> int:
        return len(self._items)


class Job:
    """One task from the broker, from arrival to its last reply frame."""

    __slots__ = ("task_id", "header", "blob", "input", "cached", "state", "future")

    def __init__(self, task_id: bytes, header: P.TaskHeader, blob: bytes, input_blob: bytes,
                 cached: CachedRunnable | None) -> None:
        self.task_id = task_id
        self.header = header
        self.blob = blob  # the runnable's bytes when ``cached`` is None
        self.input = input_blob
        self.cached = cached
        self.state = QUEUED
        self.future: concurrent.futures.Future[None] | None = None


class TaskRunner:
    """Runs jobs off the I/O thread; their frames come back through :attr:`replies`."""

    def __init__(self, threads: int, cache: RunnableCache, replies: ReplyQueue) -> None:
        self.cache = cache
        self.replies = replies
        self.max_message_bytes = defaults.MAX_MESSAGE_BYTES  # the I/O thread updates it on WELCOME
        self.threads = threads
        # The worker's shared checkpointer, if it has one: put in place of each graph's own as the
        # graph is built, before any task uses it (``worker.checkpointers``).
        self.checkpointer: SharedCheckpointer | None = None
        self._queue: HandOff[Job] = HandOff()  # sync jobs to idle task threads, one woken per job
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        # Where sync batches' items run (threads start only when used): see the module docstring.
        self._batch_threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rk8s-batch")
        execution.share_batch_threads()
        self._loop_thread: int | None = None
        self._wake_scheduled = False
        # Sync jobs the I/O thread has taken but not yet handed to a thread: see :meth:`release`.
        self._pending: list[Job] = []
        for _ in range(threads):
            self._start_thread()

    # ------------------------------------------------------------------ I/O thread side

    def start(self, job: Job) -> None:
        if job.cached is not None and job.cached.on_loop:
            job.state = ON_LOOP
            job.future = self._on_loop(self._run_async(job, job.cached))
        else:
            self._pending.append(job)

    def release(self) -> None:
        """Hand the sync jobs taken since the last call to the task threads. The I/O thread calls
        this right before it sleeps in its poller: a task thread woken earlier would only wake to
        wait for the GIL the I/O thread still holds (one more context switch per task, measured)."""
        pending = self._pending
        if pending:
            put = self._queue.put
            for job in pending:
                put(job)
            pending.clear()

    def withdraw(self, job: Job) -> bool:
        """Take back a job no thread has started yet (True), so a draining worker can hand it
        to another worker instead of running it here; a started job is left alone (False)."""
        with self._lock:
            if job.state != QUEUED:
                return False
            job.state = ABANDONED  # a thread that reaches it skips it
            return True

    def abandon(self, job: Job) -> None:
        """Stop caring about ``job``: whatever it sends from now on is dropped by the I/O thread."""
        with self._lock:
            was, job.state = job.state, ABANDONED
        if was == ON_LOOP and job.future is not None:
            job.future.cancel()
        elif was == RUNNING:
            self._start_thread()  # the old one leaves once its (uninterruptible) call returns

    # ------------------------------------------------------------------ task threads

    def _start_thread(self) -> None:
        threading.Thread(target=self._serve, name="rk8s-task", daemon=True).start()

    def _serve(self) -> None:
        waiter: Waiter[Job] = Waiter()
        get = self._queue.get
        while True:
            job = get(waiter)
            with self._lock:
                if job.state != QUEUED:
                    continue  # abandoned while it waited
                job.state = RUNNING
            last: list[bytes] | None = None
            try:
                last = self._run_sync(job)
            finally:
                with self._lock:
                    abandoned = job.state == ABANDONED
                    if job.state == RUNNING:
                        job.state = DONE
            if abandoned:
                return  # a replacement thread took this one's place (and the I/O thread answered)
            if last is not None:
                # The task's last reply goes last, right before this thread waits for the next job:
                # the I/O thread it wakes then finds the GIL free instead of waiting for it.
                self.replies.put(last)

    def _run_sync(self, job: Job) -> list[bytes] | None:
        """Run ``job``; its last reply's frames (RESULT or ERROR), for the caller to send, or None
        when it went to the event loop or stopped because it was abandoned."""
        try:
            cached = job.cached or self._load(job)
            if cached.on_loop:
                with self._lock:
                    if job.state == RUNNING:
                        job.state = ON_LOOP
                        job.future = self._on_loop(self._run_async(job, cached))
                return None
            config = execution.task_config(job.header, functools.partial(self._event, job.task_id))
            if job.header.kind == "stream" or job.header.kind == "batch":
                chunks = (execution.iterate_stream(cached.runnable, False, job.input, config, job.header.trust)
                          if job.header.kind == "stream" else
                          execution.iterate_batch(cached.runnable, False, job.input, config, job.header.items,
                                                  job.header.trust, self.max_message_bytes, self._batch_threads))
                try:
                    for chunk in chunks:
                        if job.state == ABANDONED:
                            return None  # cancelled between chunks: closing the stream stops it
                        self._reply(P.CHUNK, job.task_id, chunk)
                finally:
                    chunks.close()
                return [P.PROTOCOL, P.RESULT, job.task_id, b""]
            return self._frames(P.RESULT, job.task_id,
                                execution.run_invoke(cached.runnable, False, job.input, config, job.header.trust))
        except NotCached:  # its build failed or was evicted while the task waited: the broker resends
            return P.error_frames(job.task_id, P.E_NEED_RUNNABLE, "runnable not in this worker's cache")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the task's ERROR reply
            return P.error_frames(job.task_id, *execution.failure(exc, job.header.trust))

    def _load(self, job: Job) -> CachedRunnable:
        """The job's runnable, deserialized the first time it arrives (on a task thread: it can be
        slow), once per worker however many tasks of it arrive together (``RunnableCache.load``)."""
        blob = job.blob
        try:
            return self.cache.load(job.header.digest, functools.partial(self._build, blob) if blob else None)
        finally:
            # Kept until the build is over: a task of the same runnable arriving without the bytes
            # meanwhile takes them from here (``WarmWorker._start_task``).
            job.blob = b""

    def _build(self, blob: bytes) -> CachedRunnable:
        try:
            runnable = codec.loads(blob)
        except Exception as exc:
            raise execution.StageError("the runnable could not be rebuilt on the worker", exc) from exc
        shared = None
        if self.checkpointer is not None:
            self.checkpointer.install(runnable)
            shared = self.checkpointer.saver
        return CachedRunnable(runnable, execution.prefers_event_loop(runnable),
                              checkpointers.keeps_threads(runnable, shared))

    # ------------------------------------------------------------------ the event loop thread

    def run_on_loop(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the tasks' event loop and return its result (from another thread):
        what must live on that loop (an async database connection) is made there."""
        return self._on_loop(coroutine).result(timeout)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._loop is None:
            with self._loop_lock:  # two threads' first coroutines must not start two loops
                if self._loop is None:
                    ready = threading.Event()
                    threading.Thread(target=self._serve_loop, args=(ready,), name="rk8s-loop", daemon=True).start()
                    ready.wait()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _serve_loop(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.get_ident()
        # Sync parts of a chain on the loop (LangChain's run_in_executor) share the worker's bound
        # on threads instead of asyncio's default of min(32, CPUs + 4) more.
        self._loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="rk8s-loop-sync"))
        asyncio.set_event_loop(self._loop)
        execution.track_tasks(self._loop)  # a batch given up on cancels its items' tasks too
        ready.set()
        self._loop.run_forever()

    async def _run_async(self, job: Job, cached: CachedRunnable) -> None:
        try:
            config = execution.task_config(job.header, functools.partial(self._event, job.task_id))
            if job.header.kind == "stream" or job.header.kind == "batch":
                chunks = (execution.aiterate_stream(cached.runnable, job.input, config, job.header.trust)
                          if job.header.kind == "stream" else
                          execution.aiterate_batch(cached.runnable, job.input, config, job.header.items,
                                                   job.header.trust, self.max_message_bytes))
                reply = self._reply_on_loop
                task_id = job.task_id
                try:
                    async for chunk in chunks:
                        reply(P.CHUNK, task_id, chunk)
                finally:
                    await chunks.aclose()
                self._reply(P.RESULT, job.task_id, b"")
            else:
                self._reply(P.RESULT, job.task_id,
                            await execution.arun_invoke(cached.runnable, job.input, config, job.header.trust))
        except asyncio.CancelledError:
            pass  # abandoned: the I/O thread has answered for it
        except Exception as exc:  # noqa: BLE001
            self._send(P.error_frames(job.task_id, *execution.failure(exc, job.header.trust)))

    # ------------------------------------------------------------------ replies

    def _reply(self, command: bytes, task_id: bytes, data: bytes) -> None:
        self._send(self._frames(command, task_id, data))

    def _frames(self, command: bytes, task_id: bytes, data: bytes) -> list[bytes]:
        if len(data) > self.max_message_bytes:
            raise self._too_large(data)
        return [P.PROTOCOL, command, task_id, data]

    def _too_large(self, data: bytes) -> execution.OutputTooLarge:
        return execution.OutputTooLarge(
            f"the runnable's output is {len(data)} bytes, over the broker's limit of "
            f"{self.max_message_bytes}; return less data or raise the broker's --max-message-bytes")

    def _reply_on_loop(self, command: bytes, task_id: bytes, data: bytes) -> None:
        """:meth:`_reply` from the event loop's thread (a streamed token's way: the caller knows
        its thread, so nothing asks which it is)."""
        if len(data) > self.max_message_bytes:
            raise self._too_large(data)
        self.replies.put_quiet([P.PROTOCOL, command, task_id, data])
        if not self._wake_scheduled:
            self._wake_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._wake)

    def _event(self, task_id: bytes, data: bytes) -> None:
        """A callback event of the task (only when its caller listens): in order with its chunks."""
        if len(data) > self.max_message_bytes:
            log.warning("a callback event of %d bytes is over the broker's message limit and was not relayed",
                        len(data))
            return
        self._send([P.PROTOCOL, P.EVENT, task_id, data])

    def _send(self, frames: list[bytes]) -> None:
        if threading.get_ident() == self._loop_thread:
            self.replies.put_quiet(frames)
            if not self._wake_scheduled:
                self._wake_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._wake)
        else:
            self.replies.put(frames)

    def _wake(self) -> None:
        """Once per loop iteration that produced replies: wake the I/O thread for all of them."""
        self._wake_scheduled = False
        self.replies.wake()
