"""A hostile worker against the client's result decoder (worker.result_codec).

A worker may run a tool chosen by a prompt-injected model, so everything it sends back is decoded
as untrusted. The restricted pickle that results used to travel as let such a worker freeze the
client (a memo-shared structure hashed 2**depth times), change process-wide state (pickle's BUILD
setting attributes on objects the decoder let through) and import submodules. The first section
replays those attacks as the pickles that carried them: the decoder refuses any pickle whole, and
nothing happens. The next ones are the same attacks said the best an attacker can in the data
format itself, then the limits, then a fuzz of 100,000 inputs.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import gc
import http
import random
import sys
import time
import types
import uuid
import zoneinfo
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.prompt_values import ChatPromptValue

import worker.codec  # noqa: F401 - loaded so that process_state watches the way out's functions too
from tests.support.codec_classes import Kind, Move, Pokemon
from worker import result_codec
from worker.result_codec import CodecError, Limits, Refused, Unresolvable, loads_result

pytestmark = pytest.mark.timeout(120)


class Failed(Exception):
    pass


def tagged(tag: int, payload: Any) -> bytes:
    """A message whose value is tagged ``tag``, written as a hostile worker can."""
    return msgpack.packb([result_codec.MARKER, payload, tag])


def message(value: Any) -> bytes:
    """A message of ``value``, where ``value`` may hold msgpack.ExtType values written by hand."""
    return msgpack.packb([result_codec.MARKER, value])


def ext(tag: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(tag, payload if isinstance(payload, bytes) else msgpack.packb(payload))


def cpu_seconds(func: Callable[[], Any]) -> tuple[float, Any]:
    """This thread's CPU time for ``func()`` and its outcome (the value, or the exception)."""
    start = time.thread_time()
    try:
        outcome: Any = func()
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        outcome = exc
    return time.thread_time() - start, outcome


# What a decode may never change, whatever it is given.
WATCHED_ENUMS = (Kind.WATER, Kind.ELECTRIC, http.HTTPStatus.OK)


def process_state() -> dict[str, Any]:
    functions = {
        f"{module.__name__}.{name}": (value.__defaults__, value.__kwdefaults__, value.__code__)
        # Every module of the codec (the result codec's package, the way out) and of the worker.
        for module in [m for n, m in sorted(sys.modules.items()) if n == "worker" or n.startswith("worker.")]
        for name, value in vars(module).items() if isinstance(value, types.FunctionType)
    }
    return {
        "Counter": dict(vars(collections.Counter)),
        "OrderedDict": dict(vars(collections.OrderedDict)),
        "enums": [(member, member._value_, member._name_) for member in WATCHED_ENUMS],
        "Kind": dict(vars(Kind)),
        "Pokemon": dict(vars(Pokemon)),
        "functions": functions,
        "modules": set(sys.modules),
    }


@pytest.fixture
def unchanged() -> Iterator[None]:
    """Fails the test if it changed the process-wide state :func:`process_state` watches."""
    before = process_state()
    yield
    after = process_state()
    assert after["modules"] - before["modules"] == set(), "a decode imported modules"
    assert after == before


# ---------------------------------------------------------------------------- the pickles that carried the attacks


def memo_shared_tuples(depth: int) -> bytes:
    """A frozenset holding a tuple nested ``depth`` deep whose two children are the same tuple
    (through pickle's memo): ~7 bytes a level, 2**depth hashes to build the set."""
    body = b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    body += b"h\x00h\x00\x86q\x000" * depth  # BINGET 0 twice, TUPLE2, BINPUT 0, POP
    return b"\x80\x04" + body + b"(h\x00\x91."  # MARK, BINGET 0, FROZENSET, STOP


def build_on_global(module: str, name: str, attribute: str, value: bytes) -> bytes:
    """``module.name`` with BUILD's slot state ``{attribute: value}`` (opcodes pushing a value):
    setattr on that object."""
    return f"c{module}\n{name}\nN}}V{attribute}\n".encode() + value + b"s\x86b."


def build_on_enum_member() -> bytes:
    """The restricted pickle's own ``_enum`` rebuild of Kind.WATER, then BUILD setting its value."""
    return (f"cworker.codec\n_enum\n(V{Kind.__module__}\nVKind\nNVWATER\nVwater\ntR"
            "N}V_value_\nVhacked\ns\x86b.").encode("latin-1")


def import_submodule() -> bytes:
    """The restricted pickle's ``_model`` naming a class in a submodule the client never imported."""
    return b"cworker.codec\n_model\n(Vjson.tool\nVmain\nN}cbuiltins\nset\n)RNNtR."


OLD_ATTACKS: dict[str, Callable[[], bytes]] = {
    "memo-shared tuples in a set": lambda: memo_shared_tuples(27),
    "BUILD replacing collections.Counter.update": lambda: build_on_global(
        "collections", "Counter", "update", b"cbuiltins\nint\n"),
    "BUILD changing an Enum member's value": build_on_enum_member,
    "BUILD setting a codec helper's __defaults__": lambda: build_on_global(
        "worker.codec", "_model", "__defaults__", b"cbuiltins\ntuple\n)R"),
    "importing a submodule": import_submodule,
}


@pytest.mark.parametrize("name", list(OLD_ATTACKS))
def test_the_pickles_that_attacked_the_old_decoder_are_refused_whole_and_change_nothing(name, unchanged):
    assert "json.tool" not in sys.modules  # what "importing a submodule" would import
    payload = OLD_ATTACKS[name]()
    counter_update = collections.Counter.update
    try:
        seconds, outcome = cpu_seconds(lambda: loads_result(payload))
        assert collections.Counter.update is counter_update
    finally:  # on a decoder that obeys BUILD, put back what it changed, so other tests are not hit
        collections.Counter.update = counter_update  # type: ignore[method-assign]
    assert isinstance(outcome, Refused) and "nothing of it was run" in str(outcome), outcome
    assert seconds < 0.1  # the old decoder spent ~1.4 s hashing the memo-shared tuples
    assert "json.tool" not in sys.modules


# ---------------------------------------------------------------------------- the same attacks in the data format


def nested_tuples(depth: int, leaf: Any = 0) -> msgpack.ExtType:
    """``((...(leaf,)...),)`` ``depth`` tuples deep, as ext values written by hand."""
    value: Any = leaf
    for _ in range(depth):
        value = ext(result_codec.TUPLE, [value, value])  # both children written out: no sharing
    return value


def test_deep_and_wide_sets_of_tuples_cost_time_linear_in_their_bytes(unchanged):
    # The memo trick has no equivalent: msgpack cannot refer to a value twice, so every tuple of the
    # structure is bytes of the message. The worst an attacker gets is tuples as deep as the limit,
    # as many as fit, in sets (each hashed once per set it is an element of, plus the check).
    deep = message(ext(result_codec.SET, [nested_tuples(14, leaf=i) for i in range(8)]))
    wide = message(ext(result_codec.FROZENSET, [ext(result_codec.TUPLE, [i, i * 7919 % 10007]) for i in range(40_000)]))
    for payload in (deep, wide):
        assert len(payload) < 2 * 1024 * 1024
        seconds, outcome = cpu_seconds(lambda p=payload: loads_result(p))
        assert isinstance(outcome, (set, frozenset)) and len(outcome) > 0, outcome
        assert seconds < 2.0  # ~0.1 s on a laptop; the bound is a DoS bound, not a benchmark
    # 2**14 leaves from 2**14 tuples written out: the structure costs what it weighs.
    assert len(deep) > 8 * 2**14


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """``count`` distinct 2-tuples of ints with one hash (Python's tuple hash is not randomized)."""
    mask = (1 << 64) - 1
    p1, p2, p5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
    modulus = (1 << 61) - 1

    def rotl(x: int) -> int:
        return ((x << 31) | (x >> 33)) & mask

    def rotr(x: int) -> int:
        return ((x >> 31) | (x << 33)) & mask

    target = 0x5EED5EED5EED
    before_last = (rotr((((target - (2 ^ p5 ^ 3527539)) & mask) * pow(p1, -1, 1 << 64)) & mask))
    pairs = []
    a = 0
    while len(pairs) < count:
        acc = (rotl((p5 + a * p2) & mask) * p1) & mask
        lane = ((before_last - acc) * pow(p2, -1, 1 << 64)) & mask
        b = lane - (1 << 64) if lane >> 63 else lane
        if -modulus < b < modulus and b not in (-1, -2):
            pairs.append((a, b))
        a += 1
    assert len({hash(pair) for pair in pairs[:50]}) == 1  # the construction is right
    return pairs


@pytest.mark.parametrize("container", ["set", "dict keys"])
def test_a_hash_collision_flood_is_refused_fast(container, unchanged):
    pairs = colliding_pairs(10_000)  # quadratic: ~50 million tuple comparisons if it were built
    keys = [ext(result_codec.TUPLE, list(pair)) for pair in pairs]
    payload = message(ext(result_codec.SET, keys) if container == "set" else dict.fromkeys(keys, 1))
    seconds, outcome = cpu_seconds(lambda: loads_result(payload))
    assert isinstance(outcome, Refused) and "one hash" in str(outcome), outcome
    assert seconds < 0.5


def test_equal_values_repeated_are_not_a_collision():
    value = loads_result(message([ext(result_codec.TUPLE, [1, 2])] * 10_000 + [{ext(result_codec.TUPLE, [1, 2]): 1}]))
    assert value[0] == (1, 2) and len(value) == 10_001


# What an attacker can name: classes of modules the client imported, of the tag's kind.
NAMED: dict[str, bytes] = {
    "os.system as a model": tagged(result_codec.MODEL, ["os:system", None, "", [], 0, None, None, None]),
    "builtins.eval as an exception": tagged(result_codec.EXCEPTION, ["builtins:eval", None, ["1"], {}, None]),
    "a submodule not imported": tagged(result_codec.DATACLASS, ["json.tool:main", None, {}]),
    "a module not imported": tagged(result_codec.NAMEDTUPLE, ["antigravity:X", None, []]),
    "a __main__ submodule": tagged(result_codec.ENUM, ["pool.__main__:X", None, "A"]),
    "a module attribute that is not a class": tagged(result_codec.NAMEDTUPLE, ["json:dumps", None, []]),
    "a module through a module": tagged(result_codec.DATACLASS, ["os:path.join", None, {}]),
    "a method through a class": tagged(result_codec.DATACLASS, ["collections:OrderedDict.fromkeys", None, {}]),
    "a dunder through a class": tagged(result_codec.MODEL, ["collections:Counter.__init__", None, "", [], 0, None,
                                                            None, None]),
    "collections.Counter as a dataclass with update": tagged(result_codec.DATACLASS, [
        "collections:Counter", None, {"update": 1}]),
    "collections.Counter as an exception with update": tagged(result_codec.EXCEPTION, [
        "collections:Counter", None, [], {"update": 1}, None]),
    "an Enum as a model with _value_": tagged(result_codec.MODEL, [
        f"{Kind.__module__}:Kind", None, "_value_", ["hacked"], 1, None, None, None]),
    "an Enum member by value": tagged(result_codec.ENUM, [f"{Kind.__module__}:Kind", None, "water"]),
    "an Enum member with more to set": tagged(result_codec.ENUM, [f"{Kind.__module__}:Kind", None, "WATER",
                                                                  {"_value_": 1}]),
    "a codec helper as a model": tagged(result_codec.MODEL, ["worker.result_codec:loads_result", None, "__defaults__",
                                                             [[1]], 1, None, None, None]),
    "a codec class as an exception": tagged(result_codec.EXCEPTION, ["worker.result_codec.decoding:Decoding", None,
                                                                     [], {}, None]),
    "a runnable as a model": tagged(result_codec.MODEL, ["langchain_core.runnables.base:RunnableLambda", None, "",
                                                         [], 0, None, None, None]),
    "a BaseException": tagged(result_codec.EXCEPTION, ["builtins:SystemExit", None, [0], {}, None]),
    "an exception setting __class__": tagged(result_codec.EXCEPTION, [f"{__name__}:Failed", None, [], {
        "__class__": 1}, None]),
    "a time zone key that is a path": tagged(result_codec.ZONEINFO, b"../../../etc/passwd"),
    "a builtin class that is code": tagged(result_codec.BUILTIN_TYPE, b"eval"),
    "an unknown tag": tagged(77, []),
    "an unknown nested tag": message([ext(2, b"")]),
    "msgpack's own timestamp as a tag": tagged(-1, []),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_what_a_payload_names_is_refused_and_nothing_outside_the_value_changes(name, unchanged):
    seconds, outcome = cpu_seconds(lambda: loads_result(NAMED[name]))
    assert isinstance(outcome, CodecError), outcome
    assert seconds < 0.05


def test_refusals_say_what_and_what_to_do():
    with pytest.raises(Refused, match=r"os\.system, which is not a class"):
        loads_result(NAMED["os.system as a model"])
    with pytest.raises(Unresolvable, match=r"module json\.tool is not imported here.*import it in the client"):
        loads_result(NAMED["a submodule not imported"])
    with pytest.raises(Refused, match=r"collections\.Counter, which is not a dataclass"):
        loads_result(NAMED["collections.Counter as a dataclass with update"])
    with pytest.raises(Unresolvable, match=r"Kind has no member 'water'"):
        loads_result(NAMED["an Enum member by value"])


def test_a_counter_in_the_data_is_a_new_counter_and_the_class_is_untouched(unchanged):
    value = loads_result(tagged(result_codec.COUNTER, {"update": 1, "__init__": 2}))
    assert type(value) is collections.Counter and value == {"update": 1, "__init__": 2}


def test_data_attributes_of_an_exception_go_on_the_fresh_instance_only(unchanged):
    error = loads_result(tagged(result_codec.EXCEPTION, [f"{__name__}:Failed", None, ["boom"], {"args": 1,
                                                                                                "status": 2}, None]))
    assert type(error) is Failed and error.status == 2
    assert "status" not in vars(Failed)


# ---------------------------------------------------------------------------- limits


def test_tagged_values_nested_too_deep_are_refused_fast():
    value: Any = 0
    for _ in range(result_codec.DEFAULT_LIMITS.max_depth + 8):
        value = ext(result_codec.TUPLE, [value])
    seconds, outcome = cpu_seconds(lambda: loads_result(message(value)))
    assert isinstance(outcome, CodecError) and "deep" in str(outcome), outcome
    assert seconds < 0.05
    with pytest.raises(CodecError, match="nested"):
        result_codec.dumps_result(_nest(result_codec.DEFAULT_LIMITS.max_depth + 8))


def _nest(depth: int, leaf: Any = 0) -> Any:
    value: Any = leaf
    for _ in range(depth):
        value = (value,)
    return value


def test_values_nested_within_the_limit_come_back():
    value = _nest(result_codec.DEFAULT_LIMITS.max_depth - 1)
    assert loads_result(result_codec.dumps_result(value)) == value


def test_a_header_claiming_billions_of_elements_is_refused_without_allocating_them():
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"):  # list, dict, str
        payload = b"\x92" + msgpack.packb(result_codec.MARKER) + header + b"\x00" * 8
        seconds, outcome = cpu_seconds(lambda p=payload: loads_result(p))
        assert isinstance(outcome, CodecError), outcome
        assert seconds < 0.05


def test_too_many_elements_for_the_limits_are_refused():
    limits = Limits(max_items=1000)
    assert loads_result(message(list(range(1000))), limits=limits) == list(range(1000))
    with pytest.raises(CodecError):
        loads_result(message(list(range(2000))), limits=Limits(max_items=1000, max_bytes=10**6))


def test_a_message_over_the_size_limit_is_refused_before_it_is_read():
    big = message("x" * 5000)
    seconds, outcome = cpu_seconds(lambda: loads_result(big, limits=Limits(max_bytes=4096)))
    assert isinstance(outcome, CodecError) and "over the 4096 bytes" in str(outcome), outcome
    assert seconds < 0.01


def test_nesting_that_would_copy_the_message_over_and_over_is_refused():
    # Each tagged value's payload is a copy of its bytes: a big value under many tagged levels is
    # copied once per level.
    def under(levels: int) -> bytes:
        value: Any = "x" * 100_000
        for _ in range(levels):
            value = ext(result_codec.TUPLE, [value])
        return message(value)

    with pytest.raises(CodecError, match="copy more than 4 times"):
        loads_result(under(6), limits=Limits(expansion=4))
    with pytest.raises(CodecError, match="copy more than 16 times"):
        loads_result(under(20))
    assert loads_result(under(12)) == _nest(12, "x" * 100_000)


# ---------------------------------------------------------------------------- fuzz


PointT = collections.namedtuple("PointT", "x y")


def samples() -> list[bytes]:
    """Valid messages of every supported type."""
    values: list[Any] = [
        "Pikachu", b"\x00\x01", 7, -(2**70), 1.5, True, None, [1, "a"], (1, (2, 3)), {"a": {"b": [1]}},
        {1: "x", (1, 2): "y", None: 3}, {1, 2}, frozenset("ab"), collections.OrderedDict(a=1),
        collections.deque([1], maxlen=4), collections.Counter("aab"), collections.defaultdict(list, {"a": [1]}),
        complex(1, 2), datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
        datetime.date(2026, 1, 2), datetime.time(3, 4, tzinfo=datetime.timezone(datetime.timedelta(hours=2), "X")),
        datetime.timedelta(days=1, microseconds=5), uuid.UUID(int=12345), decimal.Decimal("-1.25E+3"),
        {"type": int}, Kind.WATER, http.HTTPStatus.OK, Pokemon(name="Pikachu"), Move("Thunderbolt", 90),
        PointT(1, 2), Failed("boom", 2), KeyError("k"),
        AIMessage("hi", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}]),
        AIMessageChunk(content="Pi", tool_call_chunks=[{"name": "f", "args": '{"x"', "id": "c1", "index": 0}]),
        ToolMessage("out", tool_call_id="c1"), [Document("page", metadata={"source": "a.txt"})],
        ChatGeneration(message=AIMessage("x")), ChatPromptValue(messages=[HumanMessage("h")]),
        {"method": "on_chain_end", "args": [{"out": [Pokemon(name="x")]}], "kwargs": {"run_id": "r"}},
    ]
    encoded = [result_codec.dumps_result(value) for value in values]
    encoded.append(result_codec.dump_exception(Failed("boom")))
    try:  # a ZoneInfo, where this machine has the time-zone database
        zone = result_codec.dumps_result(datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")))
        loads_result(zone)
        encoded.append(zone)
    except (zoneinfo.ZoneInfoNotFoundError, CodecError):
        pass
    return encoded


INTERESTING = bytes([0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC4, 0xC7, 0xC8, 0xC9,
                     0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE,
                     0xDF, 0xE0, 0xFF, 0x01, 0x03, 0x0A, 0x0B, 0x1E, 0x20, 0x22])


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        how = rng.randrange(8)
        at = rng.randrange(len(buffer)) if buffer else 0
        if how == 0 and buffer:
            buffer[at] = rng.randrange(256)
        elif how == 1 and buffer:
            buffer[at] = rng.choice(INTERESTING)
        elif how == 2 and buffer:
            buffer[at] ^= 1 << rng.randrange(8)
        elif how == 3:
            buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        elif how == 4:
            del buffer[at:at + rng.randrange(1, 9)]
        elif how == 5:
            del buffer[rng.randrange(len(buffer) + 1):]
        elif how == 6:
            other = rng.choice(others)
            start = rng.randrange(len(other))
            buffer[at:at] = other[start:start + rng.randrange(1, 40)]
        else:
            end = at + rng.randrange(1, 16)
            buffer[at:at] = buffer[at:end] * rng.randrange(1, 4)
    return bytes(buffer)


FUZZ_INPUTS = 100_000
FUZZ_SEED = 20261207


def test_a_fuzz_of_random_and_mutated_messages_returns_or_refuses_quickly_and_changes_nothing(unchanged):
    corpus = samples()
    for data in corpus:  # every sample decodes (and warms the class caches before the watch)
        loads_result(data)
    rng = random.Random(FUZZ_SEED)
    prefixes = [corpus[0][:13], corpus[-1][:13]]
    escaped: list[tuple[bytes, BaseException]] = []
    outcomes: collections.Counter[str] = collections.Counter()
    clock = time.thread_time
    # The bound is on the decoder's own work: the cyclic GC, which a long test session's heap can
    # make take a tenth of a second, runs between inputs instead (a full suite failed on it once).
    gc.disable()
    try:
        slowest, slowest_input = fuzz(rng, corpus, prefixes, clock, escaped, outcomes)
    finally:
        gc.enable()
    print(f"fuzz: {FUZZ_INPUTS} inputs, seed {FUZZ_SEED}, outcomes {dict(outcomes)}, "
          f"slowest decode {slowest * 1e3:.2f} ms CPU ({len(slowest_input)} bytes)")
    assert escaped == []
    assert slowest < 0.05, slowest_input
    assert outcomes["returned"] > 1000 and outcomes["Refused"] > 1000  # both paths were exercised


def fuzz(rng: random.Random, corpus: list[bytes], prefixes: list[bytes], clock: Callable[[], float],
         escaped: list[tuple[bytes, BaseException]], outcomes: collections.Counter[str]) -> tuple[float, bytes]:
    """Decode FUZZ_INPUTS random and mutated messages; the slowest decode's CPU time and input."""
    slowest, slowest_input = 0.0, b""
    for i in range(FUZZ_INPUTS):
        if i % 1000 == 0:
            gc.collect()
        kind = i % 10
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        elif kind == 1:
            data = rng.choice(prefixes) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        else:
            data = mutate(rng, rng.choice(corpus), corpus)
        start = clock()
        try:
            loads_result(data)
            outcomes["returned"] += 1
        except CodecError as exc:
            outcomes[type(exc).__name__] += 1
        except BaseException as exc:  # noqa: BLE001 - what the test is about
            escaped.append((data, exc))
        took = clock() - start
        if took > slowest:
            slowest, slowest_input = took, data
    return slowest, slowest_input
