"""The long-lived worker: connects to a broker, runs up to N tasks at once, keeps runnables warm.

One asyncio loop owns the socket. Each task is an asyncio task; sync runnables run in a thread
pool (see ``worker.execution``), so heartbeats keep flowing while a 60 s LLM call is in progress.
On SIGTERM the worker tells the broker it is draining, finishes what it has within the grace
period, says goodbye and exits 0: scaling a Deployment down loses no task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from langchain_core.runnables import Runnable

from worker import codec, execution
from worker import protocol as P
from worker.curve import PeerKeys

log = logging.getLogger("runnable_k8s.worker")

DEFAULT_CONCURRENCY = 4
DEFAULT_CACHE_SIZE = 64
# Kubernetes gives a Pod 30 s between SIGTERM and SIGKILL by default; leave room to say goodbye.
DEFAULT_GRACE_PERIOD = 25.0
RECONNECT_DELAY = 1.0


@dataclass
class CachedRunnable:
    runnable: Runnable
    async_only: bool


class RunnableCache:
    """Deserialized runnables by digest, so a repeated call reuses the object (and its HTTP pools)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, CachedRunnable] = OrderedDict()

    def get(self, digest: str) -> CachedRunnable | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def put(self, digest: str, item: CachedRunnable) -> None:
        self._items[digest] = item
        self._items.move_to_end(digest)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _NeedRunnable(Exception):
    pass


class _OutputTooLarge(Exception):
    pass


class WarmWorker:
    def __init__(
        self,
        address: str,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        keys: PeerKeys | None = None,
        exit_with_parent: int | None = None,
    ) -> None:
        self.address = address
        self.concurrency = concurrency
        self.grace_period = grace_period
        self.keys = keys
        self.exit_with_parent = exit_with_parent
        self.cache = RunnableCache(cache_size)
        self.tasks: dict[bytes, asyncio.Task[None]] = {}
        self.timed_out: set[bytes] = set()
        self.max_message_bytes = P.DEFAULT_MAX_MESSAGE_BYTES
        self.draining_since: float | None = None
        self.exit_code: int | None = None
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._executor = ThreadPoolExecutor(max_workers=concurrency + 4, thread_name_prefix="rk8s-task")

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(self._executor)  # LangChain's own run_in_executor uses it too
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        try:
            while self.exit_code is None:
                await self._session()
                if self.exit_code is None:
                    await asyncio.sleep(RECONNECT_DELAY)
        finally:
            for task in self.tasks.values():
                task.cancel()
            if self._socket is not None:
                self._socket.close(linger=0)
            self._context.term()
            self._executor.shutdown(wait=False, cancel_futures=True)
        return self.exit_code

    def drain(self) -> None:
        """Stop taking tasks; finish running ones within the grace period, then exit 0."""
        if self.draining_since is None:
            log.info("draining: %d tasks running, grace period %.0fs", len(self.tasks), self.grace_period)
            self.draining_since = time.monotonic()
            if self._socket is not None:
                self._send([P.PROTOCOL, P.DRAINING])

    async def _session(self) -> None:
        """One connection to the broker, until it is lost or the worker is done."""
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.address)
        self._socket = sock
        self._send([P.PROTOCOL, P.READY, P.encode_json(self._environment())])
        if self.draining_since is not None:
            self._send([P.PROTOCOL, P.DRAINING])
        broker_expiry = time.monotonic() + P.HEARTBEAT_EXPIRY
        next_heartbeat = time.monotonic() + P.HEARTBEAT_INTERVAL
        try:
            while self.exit_code is None:
                if await sock.poll(int(P.HEARTBEAT_INTERVAL * 1000 / 4), zmq.POLLIN):
                    while True:
                        try:
                            frames = await sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        broker_expiry = time.monotonic() + P.HEARTBEAT_EXPIRY
                        self._handle(frames)
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._send([P.PROTOCOL, P.HEARTBEAT])
                    next_heartbeat = now + P.HEARTBEAT_INTERVAL
                self._check_parent()
                if self.draining_since is not None:
                    self._check_drained(now)
                if now > broker_expiry and self.exit_code is None:
                    log.warning("lost the broker at %s; reconnecting", self.address)
                    for task in self.tasks.values():
                        task.cancel()  # their clients were told by the broker (or lost it too)
                    return
        finally:
            sock.close(linger=0)
            self._socket = None

    def _check_drained(self, now: float) -> None:
        if self.tasks and now - self.draining_since < self.grace_period:
            return
        for task_id, task in list(self.tasks.items()):
            log.warning("grace period over: stopping task %s", task_id.hex()[:8])
            task.cancel()
            self._send(P.error_frames(task_id, P.E_WORKER_LOST, (
                f"the worker was stopped and the task did not finish within its {self.grace_period:.0f}s "
                "grace period; raise terminationGracePeriodSeconds / --grace-period for long tasks"
            )))
        self.tasks.clear()
        self._send([P.PROTOCOL, P.BYE])
        self.exit_code = 0

    def _check_parent(self) -> None:
        if self.exit_with_parent is not None and os.getppid() != self.exit_with_parent:
            log.warning("parent process %d is gone; exiting", self.exit_with_parent)
            self.grace_period = 0.0
            self.drain()

    def _environment(self) -> dict[str, Any]:
        return {**P.environment(), "pid": os.getpid(), "concurrency": self.concurrency,
                "cache_size": self.cache.max_items}

    # ------------------------------------------------------------------ messages

    def _send(self, frames: list[bytes]) -> None:
        if self._socket is not None:
            self._socket.send_multipart(frames, copy=len(frames[-1]) < 65536)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[0] != P.PROTOCOL:
            log.warning("ignored a malformed message from the broker")
            return
        command, body = frames[1], frames[2:]
        if command == P.TASK and len(body) == 4:
            self._start_task(*body)
        elif command == P.CANCEL and body:
            task = self.tasks.get(body[0])
            if task is not None:
                task.cancel()
        elif command == P.RECONNECT:
            self._send([P.PROTOCOL, P.READY, P.encode_json(self._environment())])
        elif command == P.WELCOME and body:
            info = P.decode_json_object(body[0])
            self.max_message_bytes = int(info.get("max_message_bytes", self.max_message_bytes))
            log.info("connected to broker %s", self.address)
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
        task = asyncio.ensure_future(self._run_task(task_id, header, blob, input_blob))
        self.tasks[task_id] = task
        if header.timeout is not None:
            asyncio.get_running_loop().call_later(header.timeout, self._expire, task_id, task)

    def _expire(self, task_id: bytes, task: asyncio.Task[None]) -> None:
        if not task.done():
            self.timed_out.add(task_id)
            task.cancel()

    async def _runnable(self, header: P.TaskHeader, blob: bytes) -> CachedRunnable:
        cached = self.cache.get(header.digest)
        if cached is not None:
            return cached
        if not blob:
            raise _NeedRunnable()

        def build() -> CachedRunnable:
            try:
                runnable = codec.loads(blob)
            except Exception as exc:
                raise execution.StageError("the runnable could not be rebuilt on the worker", exc) from exc
            return CachedRunnable(runnable, execution.is_async_only(runnable))

        cached = await asyncio.get_running_loop().run_in_executor(self._executor, build)
        self.cache.put(header.digest, cached)
        return cached

    async def _run_task(self, task_id: bytes, header: P.TaskHeader, blob: bytes, input_blob: bytes) -> None:
        try:
            cached = await self._runnable(header, blob)
            config = execution.config_from_wire(header.config)
            if header.kind == "stream":
                async for chunk in execution.stream(cached.runnable, cached.async_only, input_blob, config, self._executor):
                    self._send_checked(P.CHUNK, task_id, chunk)
                self._send([P.PROTOCOL, P.RESULT, task_id, b""])
            else:
                output = await execution.invoke(cached.runnable, cached.async_only, input_blob, config, self._executor)
                self._send_checked(P.RESULT, task_id, output)
        except _NeedRunnable:
            self._send(P.error_frames(task_id, P.E_NEED_RUNNABLE, "runnable not in this worker's cache"))
        except asyncio.CancelledError:
            if task_id in self.timed_out:
                self._send(P.error_frames(task_id, P.E_TIMEOUT, (
                    f"the task ran longer than its timeout of {header.timeout:.3g}s and was stopped"
                )))
            else:
                self._send(P.error_frames(task_id, P.E_CANCELLED, "cancelled"))
        except _OutputTooLarge as exc:
            self._send(P.error_frames(task_id, P.E_PAYLOAD_TOO_LARGE, str(exc)))
        except execution.StageError as exc:
            self._send(P.error_frames(task_id, P.E_SERIALIZATION, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the runnable's own error goes back to the caller
            self._send(P.error_frames(task_id, P.E_REMOTE, f"{type(exc).__name__}: {exc}",
                                      codec.dump_exception(exc)))
        finally:
            self.tasks.pop(task_id, None)
            self.timed_out.discard(task_id)

    def _send_checked(self, command: bytes, task_id: bytes, data: bytes) -> None:
        if len(data) > self.max_message_bytes:
            raise _OutputTooLarge(
                f"the runnable's output is {len(data)} bytes, over the broker's limit of "
                f"{self.max_message_bytes}; return less data or raise the broker's --max-message-bytes"
            )
        self._send([P.PROTOCOL, command, task_id, data])
