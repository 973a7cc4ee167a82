"""How long a line of the stdio transport may be, and reading one without trusting the other side.

Ephemeral mode talks to its one-shot worker in text lines (``protocol.stdio_line``: base64 fields).
Both ends read lines from a peer they do not control: the worker reads its stdin, the client reads
the worker's stdout (a process, or a Pod's attach stream). A reader that waits for a newline
would keep whatever arrives in memory until one comes, so an endless line (a broken image, a
program that is not our worker, a hostile one) would take all of it. Every reader stops at
:data:`MAX_LINE_BYTES` and raises :class:`LineTooLong`.

This module imports nothing heavy: the client's launchers and the worker both use it.
"""

from __future__ import annotations

from typing import BinaryIO

from worker import defaults

# Room beside the largest message (runnable + input, or one output) in a line: the protocol word,
# the command name, the spaces, the task header (its config) and base64's padding of each field.
# The same slack as the broker's socket limit over --max-message-bytes.
LINE_SLACK_BYTES = 1024 * 1024


def base64_length(size: int) -> int:
    """Bytes of ``size`` bytes in base64 (padded)."""
    return 4 * -(-size // 3)


# The longest line either end accepts, its newline included: the largest message as one base64
# field plus the slack. Anything longer is not an honest peer of this version.
MAX_LINE_BYTES = base64_length(defaults.MAX_MESSAGE_BYTES + LINE_SLACK_BYTES)


class LineTooLong(ValueError):
    """A stdio line longer than :data:`MAX_LINE_BYTES` (or still without its newline at that
    length). Nothing past the limit was read; the reader must stop talking to that peer."""

    def __init__(self, what: str, size: int) -> None:
        super().__init__(f"{what} sent a line longer than {MAX_LINE_BYTES} bytes (the largest message, "
                         f"{defaults.MAX_MESSAGE_BYTES} bytes, as base64, plus {LINE_SLACK_BYTES}); {size} bytes "
                         "of it were read and no more will be")
        self.size = size


def read_line(stream: BinaryIO, what: str) -> bytes:
    """The next line of ``stream`` (b"" at the end, or the last bytes without a newline); raises
    :class:`LineTooLong` after reading at most ``MAX_LINE_BYTES + 1`` bytes of it."""
    line = stream.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise LineTooLong(what, len(line))
    return line


def take_line(buffer: bytearray, what: str, start: int = 0) -> bytes | None:
    """Remove and return the first complete line of ``buffer`` (bytes read so far from a peer), or
    None when it holds none yet; raises :class:`LineTooLong` once a line is over the limit, so the
    caller's buffer never grows much past it (by at most one read). ``start``: where to look for
    the newline (a caller that knows ``buffer[:start]`` holds none need not search it again)."""
    newline = buffer.find(b"\n", start, MAX_LINE_BYTES)
    if newline < 0:
        if len(buffer) >= MAX_LINE_BYTES:
            raise LineTooLong(what, len(buffer))
        return None
    line = bytes(buffer[: newline + 1])
    del buffer[: newline + 1]
    return line
