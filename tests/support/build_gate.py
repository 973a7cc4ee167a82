"""An object that is slow to rebuild on a worker, for as long as the test wants: a runnable that
holds one is still being deserialized when the test's other calls of it arrive.

    gate = BuildGate(tmp_path)                    # a folder the workers of this machine can reach
    runnable = RunnableLambda(lambda x: id(gate))  # travels by value, the gate by reference
    ... start concurrent first calls, wait until the broker counts them all busy ...
    gate.open()
    assert gate.builds() == 1                      # the worker built the runnable once

Unpickling a ``BuildGate`` (``_rebuild``, which the workers import from this module) writes one
line to ``builds`` in the folder, then waits until the file ``open`` exists there; when the file
``fail`` exists, the rebuild raises afterwards instead. Pickling it here builds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for_file

GATE_WAIT = 60.0  # a rebuild gives up (TimeoutError, the task's error) if the gate stays shut this long
FAILURE = "the build gate said this rebuild fails"


class BuildGate:
    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = str(folder)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _rebuild, (self.folder,)

    def open(self) -> None:
        (Path(self.folder) / "open").touch()

    def fail(self, failing: bool = True) -> None:
        """Make the rebuilds that pass the gate from now on raise (or, ``failing=False``, stop raising)."""
        path = Path(self.folder) / "fail"
        if failing:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def builds(self) -> int:
        """How many times a worker has rebuilt this gate (started to)."""
        path = Path(self.folder) / "builds"
        return len(path.read_text().splitlines()) if path.exists() else 0


def _rebuild(folder: str) -> BuildGate:
    with open(os.path.join(folder, "builds"), "a") as log:
        log.write(f"{os.getpid()}\n")
    wait_for_file(os.path.join(folder, "open"), GATE_WAIT)
    if os.path.exists(os.path.join(folder, "fail")):
        raise RuntimeError(FAILURE)
    return BuildGate(folder)
