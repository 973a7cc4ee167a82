"""``python -m worker --stdio``: run one task read from stdin, write its chunks and result to stdout.

This is what an ephemeral Pod (or a local one-shot subprocess) runs. stdout is the data channel
and nothing else may write to it: the real stdout is kept on a private descriptor, and file
descriptor 1 is pointed at stderr, so a ``print()`` inside the user's runnable ends up in the
log, not in the middle of a base64 frame.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import BinaryIO

from worker import codec, defaults, execution
from worker import protocol as P
from worker.stdio_lines import LineTooLong, read_line

log = logging.getLogger("runnable_k8s.worker")


# An ERROR's message and detail are cut to fit a line the client accepts (a huge exception text
# or pickled exception would otherwise make the client refuse the whole line).
ERROR_TEXT_BYTES = 64 * 1024


def _read_message(stdin: BinaryIO) -> tuple[bytes, list[bytes]] | None:
    """The next protocol line on stdin (other lines are skipped), or None at end of input; raises
    ``LineTooLong`` for a line over ``MAX_LINE_BYTES`` instead of reading all of it."""
    while True:
        line = read_line(stdin, "the client")
        if not line:
            return None
        message = P.parse_stdio_line(line)
        if message is not None:
            return message


class _Replies:
    """The one-shot worker's side of stdout: every line it sends fits the client's line limit."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, command: bytes, *fields: bytes) -> None:
        self.out.write(P.stdio_line(command, *fields))

    def output(self, command: bytes, data: bytes) -> None:
        """A RESULT or CHUNK, refused over the message limit as the warm worker refuses it (the
        client would refuse its line anyway, with a less useful error)."""
        if len(data) > defaults.MAX_MESSAGE_BYTES:
            raise execution.OutputTooLarge(
                f"the runnable's output is {len(data)} bytes, over the limit of {defaults.MAX_MESSAGE_BYTES} "
                "for one message; return less data (a reference such as a URL instead)")
        self.send(command, data)

    def event(self, data: bytes) -> None:
        if len(data) > defaults.MAX_MESSAGE_BYTES:
            log.warning("a callback event of %d bytes is over the message limit and was not relayed", len(data))
            return
        self.send(P.EVENT, data)

    def error(self, code: bytes, message: str, detail: bytes = b"") -> None:
        text = message.encode("utf-8", "replace")
        if len(text) > ERROR_TEXT_BYTES:
            text = text[:ERROR_TEXT_BYTES] + b"... (cut)"
        self.send(P.ERROR, b"", code, text, detail if len(detail) <= defaults.MAX_MESSAGE_BYTES else b"")


def run_stdio(stdin: BinaryIO | None = None) -> int:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    replies = _Replies(out)
    try:
        return _serve(stdin or sys.stdin.buffer, replies)
    except LineTooLong as exc:
        log.error("%s; stopping", exc)
        replies.error(P.E_PAYLOAD_TOO_LARGE,
                      f"{exc}. A runnable-k8s client of this version never sends one: check that the client and "
                      "the worker image run the same runnable-k8s")
        return 2


def _serve(stdin: BinaryIO, replies: _Replies) -> int:
    """HELLO, READY, TASK and its replies: the session of one one-shot worker."""
    send, send_output, send_event, send_error = replies.send, replies.output, replies.event, replies.error
    hello = _read_message(stdin)
    if hello is None or hello[0] != P.HELLO or not hello[1]:
        log.error("expected HELLO on stdin; got %s", hello and P.COMMAND_NAMES.get(hello[0]))
        return 2
    environment = P.environment()
    problem = P.incompatibility(P.decode_json_object(hello[1][0]), environment)
    if problem:
        send_error(P.E_INCOMPATIBLE, f"this worker cannot run the client's objects: {problem}")
        return 3
    send(P.READY, P.encode_json({**environment, "pid": os.getpid()}))

    task = _read_message(stdin)
    if task is None or task[0] != P.TASK or len(task[1]) != 3:
        log.error("expected TASK on stdin")
        return 2
    header_bytes, runnable_blob, input_blob = task[1]
    try:
        header = P.TaskHeader.from_bytes(header_bytes)
    except ValueError as exc:
        send_error(P.E_BAD_REQUEST, f"bad task header: {exc}")
        return 2
    try:
        try:
            runnable = codec.loads(runnable_blob)
        except codec.CodecError as exc:
            raise execution.StageError("the runnable could not be rebuilt on the worker", exc) from exc
        async_only = execution.is_async_only(runnable)
        config = execution.task_config(header, send_event)
        if header.kind == "stream":
            for chunk in execution.iterate_stream(runnable, async_only, input_blob, config, header.trust):
                send_output(P.CHUNK, chunk)
            _flush_own_traces()
            send(P.RESULT, b"")
        elif header.kind == "batch":  # not sent by ephemeral mode today, but served like the warm worker
            for item in execution.iterate_batch(runnable, async_only, input_blob, config, header.items,
                                                header.trust, defaults.MAX_MESSAGE_BYTES):
                send_output(P.CHUNK, item)
            _flush_own_traces()
            send(P.RESULT, b"")
        else:
            output = execution.run_invoke(runnable, async_only, input_blob, config, header.trust)
            _flush_own_traces()
            send_output(P.RESULT, output)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as its ERROR
        _flush_own_traces()
        send_error(*execution.failure(exc, header.trust))
    return 0


def _flush_own_traces() -> None:
    """Post what this worker's own LangSmith tracing recorded of the task, before its last reply.

    A one-shot worker is stopped (its process killed, its Pod deleted) as soon as the client has
    read its last reply, so runs still queued in LangSmith's background thread then would be lost.
    Its own tracing only runs when the operator turned it on (LANGSMITH_* in its environment) and
    the task's caller relays no callbacks (docs/langchain.md#tracing); otherwise there is no client
    to flush and this costs a dictionary lookup."""
    tracers = sys.modules.get("langchain_core.tracers.langchain")
    if tracers is None:
        return
    try:
        tracers.wait_for_all_tracers()
    except Exception as exc:  # noqa: BLE001 - a tracing backend that is down must not fail the task
        log.warning("the worker's own traces of this task could not be posted: %s", exc)
