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

log = logging.getLogger("runnable_k8s.worker")


def _read_message(stdin: BinaryIO) -> tuple[bytes, list[bytes]] | None:
    """The next protocol line on stdin (other lines are skipped), or None at end of input."""
    while True:
        line = stdin.readline()
        if not line:
            return None
        message = P.parse_stdio_line(line)
        if message is not None:
            return message


def run_stdio(stdin: BinaryIO | None = None) -> int:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    stdin = stdin or sys.stdin.buffer

    def send(command: bytes, *fields: bytes) -> None:
        out.write(P.stdio_line(command, *fields))

    hello = _read_message(stdin)
    if hello is None or hello[0] != P.HELLO or not hello[1]:
        log.error("expected HELLO on stdin; got %s", hello and P.COMMAND_NAMES.get(hello[0]))
        return 2
    environment = P.environment()
    problem = P.incompatibility(P.decode_json_object(hello[1][0]), environment)
    if problem:
        send(P.ERROR, b"", P.E_INCOMPATIBLE, f"this worker cannot run the client's objects: {problem}".encode())
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
        send(P.ERROR, b"", P.E_BAD_REQUEST, f"bad task header: {exc}".encode())
        return 2
    try:
        try:
            runnable = codec.loads(runnable_blob)
        except codec.CodecError as exc:
            raise execution.StageError("the runnable could not be rebuilt on the worker", exc) from exc
        async_only = execution.is_async_only(runnable)
        config = execution.task_config(header, lambda data: send(P.EVENT, data))
        if header.kind == "stream":
            for chunk in execution.iterate_stream(runnable, async_only, input_blob, config, header.trust):
                send(P.CHUNK, chunk)
            send(P.RESULT, b"")
        elif header.kind == "batch":  # not sent by ephemeral mode today, but served like the warm worker
            for item in execution.iterate_batch(runnable, async_only, input_blob, config, header.items,
                                                header.trust, defaults.MAX_MESSAGE_BYTES):
                send(P.CHUNK, item)
            send(P.RESULT, b"")
        else:
            send(P.RESULT, execution.run_invoke(runnable, async_only, input_blob, config, header.trust))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as its ERROR
        code, message, detail = execution.failure(exc, header.trust)
        send(P.ERROR, b"", code, message.encode(), detail)
    return 0
