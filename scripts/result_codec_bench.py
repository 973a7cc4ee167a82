"""Encode and decode cost of the way back (worker to client), in microseconds per operation.

Compares, on three values a worker sends back (a short str, an AIMessageChunk with content and a
tool-call chunk, a ~10 KB dict of nested JSON-like data):

* ``old``: the restricted pickle that results travelled as before ``worker.result_codec``, loaded
  from a file holding that older ``worker/codec.py`` (``--old``; skipped when absent). Get it with
  ``git show 586bd88:worker/codec.py > /tmp/old_codec.py``;
* ``new``: ``worker.result_codec.dumps_result`` / ``loads_result`` (msgpack, data only);
* ``floor``: plain ``pickle.dumps`` / ``pickle.loads``, which decode anything and check nothing.

Each figure is the median of ``--repeats`` runs of ``--number`` operations, timed in this
thread's CPU time (``time.thread_time``), so that other processes on a shared machine disturb it
less than they would a wall clock. The candidates are interleaved within each repeat.

    .venv/bin/python scripts/result_codec_bench.py [--old /tmp/old_codec.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langchain_core.messages import AIMessageChunk

from worker import result_codec


def nested_json(size: int = 10_000, seed: int = 7) -> dict[str, Any]:
    """A dict of nested dicts and lists of str, int, float, bool and None, about ``size`` bytes of JSON."""
    rnd = random.Random(seed)

    def leaf() -> Any:
        return rnd.choice([rnd.randint(0, 10**6), rnd.random(), "w" * rnd.randint(1, 20), True, None])

    def node(depth: int) -> Any:
        if depth == 0:
            return leaf()
        if rnd.random() < 0.5:
            return {f"k{i}": node(depth - 1) for i in range(rnd.randint(1, 5))}
        return [node(depth - 1) for _ in range(rnd.randint(1, 4))]

    out: dict[str, Any] = {}
    while len(json.dumps(out)) < size:
        out[f"key{len(out)}"] = node(3)
    return out


VALUES: dict[str, Any] = {
    "str": "Pikachu used Thunderbolt",
    "AIMessageChunk": AIMessageChunk(content="Pika", tool_call_chunks=[
        {"name": "search", "args": '{"q": "pik', "id": "call_1", "index": 0}]),
    "dict ~10 KB": nested_json(),
}


def load_old(path: Path) -> ModuleType | None:
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("old_result_codec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its pickles name their rebuild functions by this module name
    spec.loader.exec_module(module)
    return module


def per_op(func: Callable[[], Any], number: int) -> float:
    start = time.thread_time()
    for _ in range(number):
        func()
    return (time.thread_time() - start) / number * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=Path("/tmp/old_codec.py"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--number", type=int, default=0, help="operations per repeat (default: by value size)")
    args = parser.parse_args(argv)
    old = load_old(args.old)
    codecs: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {}
    if old is not None:
        codecs["old"] = (old.dumps_result, old.loads_result)
    codecs["new"] = (result_codec.dumps_result, result_codec.loads_result)
    codecs["floor"] = (pickle.dumps, pickle.loads)

    print(f"{'value':<16}{'op':<8}" + "".join(f"{name:>10}" for name in codecs) + "   (µs per op, median)")
    for label, value in VALUES.items():
        encoded = {name: dumps(value) for name, (dumps, _) in codecs.items()}
        for name, (_, loads) in codecs.items():
            assert loads(encoded[name]) == value, f"{name} does not round-trip {label}"
        number = args.number or (200 if len(encoded["new"]) > 1000 else 5000)
        for op in ("encode", "decode"):
            runs: dict[str, list[float]] = {name: [] for name in codecs}
            for _ in range(args.repeats):
                for name, (dumps, loads) in codecs.items():
                    data = encoded[name]
                    func = (partial(dumps, value) if op == "encode" else partial(loads, data))
                    runs[name].append(per_op(func, number))
            print(f"{label:<16}{op:<8}" + "".join(f"{statistics.median(r):>10.2f}" for r in runs.values()))
        print(f"{'':<16}{'bytes':<8}" + "".join(f"{len(b):>10}" for b in encoded.values()))


if __name__ == "__main__":
    main()
