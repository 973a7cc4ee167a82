"""Encode and decode cost of the way back (worker to client), in microseconds per operation.

Compares, on values a worker sends back (a short str; one token as a streaming chat model yields
it, an AIMessageChunk made by LangChain's own ``astream`` of the bench's fake chat model; a last
chunk with a tool-call chunk, usage and response metadata; a ~10 KB dict of nested JSON-like data):

* ``old``: the restricted pickle that results travelled as before ``worker.result_codec``, loaded
  from a file holding that older ``worker/codec.py`` (``--old``; skipped when absent). Get it with
  ``git show 586bd88:worker/codec.py > /tmp/old_codec.py``;
* ``new``: ``worker.result_codec.dumps_result`` / ``loads_result`` (msgpack, data only);
* ``langchain``: LangChain's own ``dumpd`` / ``load`` (its JSON-able serialization, the dict, not
  the JSON text), for the LangChain objects only;
* ``floor``: plain ``pickle.dumps`` / ``pickle.loads``, which decode anything and check nothing.

Each figure is the median of ``--repeats`` runs of ``--number`` operations, timed in this
thread's CPU time (``time.thread_time``), so that other processes on a shared machine disturb it
less than they would a wall clock. The candidates are interleaved within each repeat.

    .venv/bin/python scripts/result_codec_bench.py [--old /tmp/old_codec.py]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import pickle
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langchain_core.load import dumpd, load
from langchain_core.messages import AIMessageChunk

from pool.bench import fake_llm
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


def streamed_token() -> AIMessageChunk:
    """A token as the bench's fake chat model streams it (``scripts/cpu_per_hop.py --workload llm``):
    LangChain's ``astream`` sets its content, run id and (empty) response metadata."""

    async def first() -> Any:
        async for chunk in fake_llm.build(median_ms=0.0, tokens=3).astream("hello"):
            return chunk

    return asyncio.run(first())


VALUES: dict[str, Any] = {
    "str": "Pikachu used Thunderbolt",
    "token": streamed_token(),
    "AIMessageChunk": AIMessageChunk(
        content="Pika", id="run-1", response_metadata={"model_name": "fake", "finish_reason": "tool_calls"},
        usage_metadata={"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
        tool_call_chunks=[{"name": "search", "args": '{"q": "pik', "id": "call_1", "index": 0}]),
    "dict ~10 KB": nested_json(),
}
LANGCHAIN_VALUES = {"token", "AIMessageChunk"}


def _load_langchain(data: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (load's warning that its API is in beta, once per call)
        return load(data)


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
    codecs: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {}
    if old is not None:
        codecs["old"] = (old.dumps_result, old.loads_result)
    codecs["new"] = (result_codec.dumps_result, result_codec.loads_result)
    codecs["langchain"] = (dumpd, _load_langchain)
    codecs["floor"] = (pickle.dumps, pickle.loads)

    print(f"{'value':<16}{'op':<8}" + "".join(f"{name:>10}" for name in codecs) + "   (µs per op, median)")
    for label, value in VALUES.items():
        here = {name: pair for name, pair in codecs.items() if name != "langchain" or label in LANGCHAIN_VALUES}
        encoded = {name: dumps(value) for name, (dumps, _) in here.items()}
        for name, (_, loads) in here.items():
            back = loads(encoded[name])
            assert back == value, f"{name} does not round-trip {label}"
            if name in ("new", "floor"):  # same class, same fields set (LangChain's load sets them all)
                assert type(back) is type(value) and getattr(back, "model_fields_set", None) == getattr(
                    value, "model_fields_set", None), f"{name} does not round-trip {label} exactly"
        number = args.number or (200 if len(encoded["new"]) > 1000 else 5000)
        for op in ("encode", "decode"):
            runs: dict[str, list[float]] = {name: [] for name in here}
            for _ in range(args.repeats):
                for name, (dumps, loads) in here.items():
                    data = encoded[name]
                    func = (partial(dumps, value) if op == "encode" else partial(loads, data))
                    runs[name].append(per_op(func, number))
            print(f"{label:<16}{op:<8}" + "".join(
                f"{statistics.median(runs[name]):>10.2f}" if name in runs else f"{'-':>10}" for name in codecs))
        sizes = {name: len(data if isinstance(data, bytes) else json.dumps(data)) for name, data in encoded.items()}
        print(f"{'':<16}{'bytes':<8}" + "".join(f"{sizes[name]:>10}" if name in sizes else f"{'-':>10}"
                                                for name in codecs))


if __name__ == "__main__":
    main()
