"""What ``runnable-k8s`` and ``python -m worker`` share on the command line: the ``--version``
text and the deprecated alias of a renamed flag.

It lives in ``worker`` because the worker program must not import ``pool`` (a worker image needs
only ``worker``); ``pool.cli`` imports it from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "runnable-k8s"


def version_text(program: str) -> str:
    """``PROGRAM VERSION (protocol RK8S/N)``: the installed package's version, from its metadata,
    and the wire protocol's, which is what decides whether a broker, its workers and its clients
    can talk (a mismatch is refused at HELLO/READY)."""
    from importlib import metadata

    from worker.protocol import PROTOCOL

    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown (not installed: pip install -e .)"
    return f"{program} {version} (protocol {PROTOCOL.decode()})"


def add_version(parser: argparse.ArgumentParser, program: str) -> None:
    parser.add_argument("--version", action="version", version=version_text(program),
                        help="print the package version and the wire protocol version, then exit")


class DeprecatedAlias(argparse.Action):
    """An old flag name that still works: it stores into the new flag's ``dest`` and prints one
    line to stderr naming the new flag, so scripts keep running while their authors learn the
    new name. ``replacement`` is the new flag (``--slots``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, replacement: str, **kwargs: Any) -> None:
        self.replacement = replacement
        kwargs.setdefault("help", f"deprecated name of {replacement}")
        kwargs["default"] = argparse.SUPPRESS  # the new flag's default stands unless this one is given
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.replacement} (same meaning)",
              file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)
