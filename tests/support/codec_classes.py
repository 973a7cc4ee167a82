"""Small classes of the kinds the result codec rebuilds on the client (a pydantic model, a
dataclass, an Enum), shared by tests/test_result_trust.py and tests/test_result_codec_hostile.py.

The codec names a class by module path ("tests.support.codec_classes:Pokemon"), so one module
declares them once: a hostile payload and a real worker's output name the same class, and a test
module that imports these has them in ``sys.modules`` (the client imports nothing a worker names).
"""

from __future__ import annotations

import dataclasses
import enum

from pydantic import BaseModel


class Pokemon(BaseModel):
    name: str
    level: int = 5


@dataclasses.dataclass(frozen=True)
class Move:
    name: str
    power: int


class Kind(enum.Enum):
    ELECTRIC = "electric"
    WATER = "water"
