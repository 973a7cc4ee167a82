"""The way back carries data, never code (docs/design.md, "The way back is data").

A client does not trust its workers: outputs, streamed chunks and exception details decode on the
client (worker.result_codec: msgpack with type tags, no pickle) without running anything the
worker (or the broker) chose. Pickles are refused whole, and messages of the data format naming
what is not data are refused naming it, with a SerializationError; their side effect (creating a
marker file) never happens. A worker refuses, itself, what it cannot send as data, unless the
client trusts it. tests/test_result_codec_hostile.py holds the attacks on the format itself.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import datetime
import decimal
import enum
import os
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from langchain_core.documents import Document
from langchain_core.load.serializable import Serializable
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.runnables import RunnableLambda
from pydantic import BaseModel, Field, PrivateAttr

from pool import LocalPool, RemoteError, RunnableK8s, SerializationError
from pool.client.calls import RemoteCall, decode_output, encode_input, encode_runnable
from pool.ephemeral.local_launcher import ProcessChannel
from pool.ephemeral.session import EphemeralBackend
from pool.errors import error_from_wire
from tests.support.codec_classes import Kind, Move, Pokemon
from tests.support.raw_worker import RawWorker
from worker import codec, result_codec
from worker import protocol as P

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------- what must round-trip


Point = collections.namedtuple("Point", "x y")


class WithPrivate(BaseModel):
    name: str
    _cache: dict[str, int] = PrivateAttr(default_factory=dict)


class Aliased(BaseModel):
    name: str = Field(alias="pokemon-name")


class NeedsKeywords(Exception):
    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


DATA: dict[str, Any] = {
    "str": "Pikachu", "bytes": b"\x00\x01", "int": 7, "float": 1.5, "bool": True, "none": None,
    "list": [1, "a"], "tuple": (1, 2), "dict": {"a": {"b": [1]}}, "set": {1, 2}, "frozenset": frozenset("ab"),
    "AIMessage": AIMessage("hi", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}],
                           usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}),
    "AIMessageChunk": AIMessageChunk(content="Pi", tool_call_chunks=[
        {"name": "f", "args": '{"x"', "id": "c1", "index": 0}]),
    "Documents": [Document("page", metadata={"source": "a.txt"}), Document("other")],
    "ToolMessage": ToolMessage("result", tool_call_id="c1", artifact={"rows": 3}, status="error"),
    "HumanMessage": HumanMessage("hello", name="ash", id="m1"),
    "ChatGeneration": ChatGeneration(message=AIMessage("x")),
    "Generation": Generation(text="t"),
    "ChatPromptValue": ChatPromptValue(messages=[HumanMessage("h")]),
    "StringPromptValue": StringPromptValue(text="s"),
    "pydantic": Pokemon(name="Pikachu"),
    "dataclass": Move("Thunderbolt", 90),
    "enum": Kind.WATER,
    "namedtuple": Point(1, 2),
    "datetime": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
    "date": datetime.date(2026, 1, 2), "time": datetime.time(3, 4), "timedelta": datetime.timedelta(hours=3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"), "decimal": decimal.Decimal("1.25"),
    "big int": -(2**100), "complex": complex(1, -2), "timezone": datetime.timezone(datetime.timedelta(hours=2), "X"),
    "ZoneInfo": datetime.datetime(2026, 7, 1, 12, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Paris")),
    "non-str keys": {(1, "a"): 1, 2: 2, None: 3, 1.5: 4}, "set of tuples": {(1, (2, 3)), frozenset({4})},
    "OrderedDict": collections.OrderedDict(b=1, a=2), "deque": collections.deque([1, 2], maxlen=3),
    "Counter": collections.Counter("abca"), "defaultdict": collections.defaultdict(list, {"a": [1]}),
    "builtin class": {"type": int}, "IntEnum": __import__("http").HTTPStatus.OK,
    "nested models": ChatGeneration(message=AIMessageChunk(content=[{"type": "text", "text": "x"}])),
}


@pytest.mark.parametrize("name", list(DATA))
def test_outputs_round_trip_as_data_with_their_type(name):
    value = DATA[name]
    out = codec.loads_result(codec.dumps_result(value))
    assert out == value and type(out) is type(value)
    if isinstance(value, BaseModel):  # what model_construct makes of the same state, slot for slot
        built = type(value).model_construct(set(value.model_fields_set), **value.__dict__, **(value.model_extra or {}))
        for slot in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
            assert getattr(out, slot) == getattr(built, slot), slot


def test_a_model_with_extra_values_private_attributes_and_aliases_comes_back_whole():
    message = AIMessage("hi", custom="extra value")  # extra="allow": kept, and in the fields set
    out = codec.loads_result(codec.dumps_result(message))
    assert out == message and out.model_extra == {"custom": "extra value"} and "custom" in out.model_fields_set
    private = WithPrivate(name="x")
    private._cache = {"k": 1}
    out = codec.loads_result(codec.dumps_result(private))
    assert out._cache == {"k": 1} and out == private
    aliased = Aliased(**{"pokemon-name": "Pikachu"})
    out = codec.loads_result(codec.dumps_result(aliased))
    assert out == aliased and out.name == "Pikachu"


def test_exceptions_keep_their_importable_type_without_their_init_being_called():
    info = codec.load_exception(codec.dump_exception(NeedsKeywords("no", status=429)))
    assert type(info.exception) is NeedsKeywords and info.exception.status == 429
    assert isinstance(error_from_wire(P.E_REMOTE, "", codec.dump_exception(KeyError("k"))), KeyError)


def test_exception_notes_and_data_attributes_come_back():
    error = NeedsKeywords("no", status=429)
    error.add_note("while calling the tool")
    rebuilt = codec.load_exception(codec.dump_exception(error)).exception
    assert isinstance(rebuilt, NeedsKeywords) and rebuilt.status == 429
    assert "while calling the tool" in rebuilt.__notes__


def test_openai_errors_keep_their_type_and_data_attributes():
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    request = httpx.Request("POST", "https://api.example/v1/chat")
    error = openai.RateLimitError("slow down", response=httpx.Response(429, request=request), body={"e": 1})
    rebuilt = error_from_wire(P.E_REMOTE, "", codec.dump_exception(error))
    assert type(rebuilt) is openai.RateLimitError
    assert rebuilt.status_code == 429 and rebuilt.body == {"e": 1}


def test_an_exception_of_a_class_unknown_here_is_a_remote_error_with_type_and_traceback():
    class LocalOnly(Exception):
        pass

    try:
        raise LocalOnly("boom")
    except LocalOnly as exc:
        detail = codec.dump_exception(exc)
    error = error_from_wire(P.E_REMOTE, "", detail)
    assert isinstance(error, RemoteError)
    assert error.remote_type.endswith("LocalOnly") and "raise LocalOnly" in error.remote_traceback


# ---------------------------------------------------------------------------- hostile payloads


def tagged(tag: int, payload: Any) -> bytes:
    """A message of the data format whose value is tagged ``tag`` (what a hostile worker can write)."""
    return msgpack.packb([result_codec.MARKER, payload, tag])


class Reduces:
    """Pickles as ``func(*args)``: how a hostile worker would write its payload."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return self.func, self.args


def touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def getattr_chain(marker: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch ...')`` written by hand, protocol 0."""
    command = f"touch {marker}".encode()
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + command + b"\ntR.")


HOSTILE: dict[str, Callable[[Path], bytes]] = {
    "os.system": lambda m: pickle.dumps(Reduces(os.system, f"touch {m}")),
    "builtins.eval": lambda m: pickle.dumps(Reduces(builtins.eval, touch(m))),
    "builtins.exec": lambda m: pickle.dumps(Reduces(builtins.exec, touch(m))),
    "subprocess.Popen": lambda m: pickle.dumps(Reduces(subprocess.Popen, ["touch", str(m)])),
    "getattr": getattr_chain,
    "copyreg._reconstructor": lambda m: pickle.dumps(Reduces(__import__("copyreg")._reconstructor,
                                                             subprocess.Popen, object, None)),
    "protocol-0 object": lambda m: pickle.dumps(Reduces(os.system, f"touch {m}"), protocol=0),
    "bytes of a huge size": lambda m: pickle.dumps(Reduces(bytes, 2**40)),
    # The data format itself, naming what is not data of the tag's kind:
    "model named os.system": lambda m: tagged(result_codec.MODEL, ["os:system", None, "", [], 0, None, None, None]),
    "model naming a runnable": lambda m: tagged(result_codec.MODEL, [
        "langchain_core.runnables.base:RunnableLambda", None, "", [], 0, None, None, None]),
    "dataclass named subprocess.Popen": lambda m: tagged(result_codec.DATACLASS, ["subprocess:Popen", None,
                                                                                  {"args": ["touch", str(m)]}]),
    "SystemExit as an exception": lambda m: tagged(result_codec.EXCEPTION, ["builtins:SystemExit", None, [0], {},
                                                                             None]),
    "exception named os.system": lambda m: tagged(result_codec.EXCEPTION, ["os:system", None, [f"touch {m}"], {},
                                                                            None]),
    "namedtuple named builtins.eval": lambda m: tagged(result_codec.NAMEDTUPLE, ["builtins:eval", None, [touch(m)]]),
    "an unknown tag": lambda m: tagged(99, [touch(m)]),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_output_is_refused_naming_what_and_runs_nothing(name, tmp_path):
    marker = tmp_path / "pwned"
    payload = HOSTILE[name](marker)
    with pytest.raises(SerializationError, match="refused") as info:
        decode_output(payload)
    assert "nothing" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "getattr"])
def test_a_hostile_error_detail_is_refused_and_runs_nothing(name, tmp_path):
    marker = tmp_path / "pwned"
    hostile = HOSTILE[name](marker)
    whole = error_from_wire(P.E_REMOTE, "boom", hostile)
    nested = error_from_wire(P.E_REMOTE, "boom", codec.dumps_result(
        {"type_name": "x.Y", "message": "m", "traceback": "", "exception": hostile}))
    for error in (whole, nested):
        assert isinstance(error, SerializationError) and "refused" in str(error)
    assert not marker.exists()


def test_the_refusal_names_what_was_refused(tmp_path):
    with pytest.raises(SerializationError, match="pickle"):
        decode_output(HOSTILE["os.system"](tmp_path / "pwned"))
    with pytest.raises(SerializationError, match=r"os\.system, which is not a class"):
        decode_output(HOSTILE["model named os.system"](tmp_path / "pwned"))
    with pytest.raises(SerializationError, match=r"RunnableLambda, which is not a pydantic model \(and not a runnable"):
        decode_output(HOSTILE["model naming a runnable"](tmp_path / "pwned"))


def test_a_malformed_message_is_a_serialization_error_naming_the_problem():
    malformed = tagged(result_codec.MODEL, [f"{Pokemon.__module__}:Pokemon", None, "name,level", ["x", 1], "not a mask",
                                            None, None, None])
    with pytest.raises(SerializationError, match="malformed fields set"):
        decode_output(malformed)


def test_trusting_workers_decodes_with_full_pickle():
    data = codec.dumps_output(len, trusted=True)
    assert decode_output(data, trusted=True) is len
    with pytest.raises(SerializationError):
        decode_output(data)


# ---------------------------------------------------------------------------- refused on the worker


@pytest.mark.parametrize("value", [lambda: 1, os.system, threading.Lock(), RunnableLambda(len), object()],
                         ids=["lambda", "builtin function", "lock", "runnable", "object"])
def test_the_worker_refuses_what_is_not_data_and_says_what_to_return(value):
    with pytest.raises(codec.CodecError, match="trust_workers=True"):
        codec.dumps_result(value)


# ---------------------------------------------------------------------------- no secret by value


class HoldsASecret(Serializable):
    api_key: str
    transform: Callable[[str], str]

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "HOLDS_A_SECRET_KEY"}


def test_an_object_declaring_secrets_is_never_pickled_by_value():
    holder = HoldsASecret(api_key="sk-never-in-the-bytes", transform=lambda s: s.upper())
    for value in (holder, {"nested": [holder]}):
        with pytest.raises(codec.CodecError, match=r"HoldsASecret.*transform") as info:
            codec.dumps(value)
        assert "api_key" in str(info.value) and "sk-never" not in str(info.value)
    with pytest.raises(SerializationError, match="HoldsASecret"):
        encode_runnable(RunnableLambda(lambda x, h=holder: h.transform(x)))


# ---------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=4) as local:
        yield local


def returns_a_function(_: Any) -> Any:
    return len


def test_a_real_worker_refuses_a_non_data_output_unless_the_client_trusts_it(pool):
    remote = RunnableK8s(bound=RunnableLambda(returns_a_function), pool=pool.address, mode="warm", timeout=30)
    with pytest.raises(SerializationError, match="trust_workers"):
        remote.invoke(1)
    trusted = RunnableK8s(bound=RunnableLambda(returns_a_function), pool=pool.address, mode="warm", timeout=30,
                          trust_workers=True)
    assert trusted.invoke(1) is len


def test_the_trust_environment_variable_reaches_the_worker(pool, monkeypatch):
    monkeypatch.setenv("RUNNABLE_K8S_TRUST_WORKERS", "1")
    remote = RunnableK8s(bound=RunnableLambda(returns_a_function), pool=pool.address, mode="warm", timeout=30)
    assert remote.invoke(1) is len


def structured(_: Any) -> Any:
    return {"pokemon": Pokemon(name="Pikachu"), "move": Move("Thunderbolt", 90), "kind": Kind.ELECTRIC}


def test_a_real_worker_sends_models_dataclasses_and_enums_back_as_data(pool):
    remote = RunnableK8s(bound=RunnableLambda(structured), pool=pool.address, mode="warm", timeout=30)
    assert remote.invoke(1) == structured(1)
    assert list(remote.stream(1)) == [structured(1)]


def every_supported_value(_: Any) -> Any:
    return DATA


def raises_with_data(_: Any) -> Any:
    error = NeedsKeywords("slow down", status=429)
    error.add_note("from the tool")
    raise error


def test_every_supported_type_round_trips_through_a_real_pool(pool):
    remote = RunnableK8s(bound=RunnableLambda(every_supported_value), pool=pool.address, mode="warm", timeout=30)
    for out in (remote.invoke(1), *remote.stream(1), *remote.batch([1, 2])):
        assert out == DATA
        assert {name: type(value) for name, value in out.items()} == {name: type(v) for name, v in DATA.items()}
    failing = RunnableK8s(bound=RunnableLambda(raises_with_data), pool=pool.address, mode="warm", timeout=30)
    with pytest.raises(NeedsKeywords) as info:
        failing.invoke(1)
    assert info.value.status == 429 and "from the tool" in info.value.__notes__


def test_a_class_the_client_sent_by_value_comes_back_as_itself(pool):
    @dataclasses.dataclass
    class Note:  # a local class: cloudpickle sends it by value, with a tracker id
        text: str

    class Mood(enum.Enum):
        CALM = "calm"

    def sight(name: str) -> Any:
        return {"note": Note(name), "mood": Mood.CALM}

    remote = RunnableK8s(bound=RunnableLambda(sight), pool=pool.address, mode="warm", timeout=30)
    out = remote.invoke("Pikachu")
    assert type(out["note"]) is Note and out["note"].text == "Pikachu"
    assert out["mood"] is Mood.CALM


ROGUE_ANSWERS: dict[str, Callable[[bytes, bytes], list[list[bytes]]]] = {
    "result": lambda task, payload: [[P.PROTOCOL, P.RESULT, task, payload]],
    "error": lambda task, payload: [P.error_frames(task, P.E_REMOTE, "boom", payload)],
}


@pytest.mark.parametrize("how", list(ROGUE_ANSWERS))
@pytest.mark.parametrize("hostile", ["os.system", "builtins.exec", "subprocess.Popen", "getattr",
                                     "dataclass named subprocess.Popen"])
def test_a_rogue_worker_cannot_run_code_in_the_client(how, hostile, tmp_path):
    marker = tmp_path / "pwned"
    payload = HOSTILE[hostile](marker)
    with LocalPool(workers=0) as rogue_pool, \
            RawWorker(rogue_pool.address, answer=lambda task: ROGUE_ANSWERS[how](task, payload)):
        remote = RunnableK8s(bound=RunnableLambda(len), pool=rogue_pool.address, mode="warm", timeout=20)
        with pytest.raises(SerializationError, match="refused"):
            remote.invoke("abc")
    assert not marker.exists()


def test_a_rogue_worker_cannot_run_code_through_a_streamed_chunk(tmp_path):
    marker = tmp_path / "pwned"
    payload = HOSTILE["os.system"](marker)

    def answer(task: bytes) -> list[list[bytes]]:
        return [[P.PROTOCOL, P.CHUNK, task, codec.dumps_result("fine")], [P.PROTOCOL, P.CHUNK, task, payload],
                [P.PROTOCOL, P.RESULT, task, b""]]

    with LocalPool(workers=0) as rogue_pool, RawWorker(rogue_pool.address, answer=answer):
        remote = RunnableK8s(bound=RunnableLambda(len), pool=rogue_pool.address, mode="warm", timeout=20)
        seen = []
        with pytest.raises(SerializationError, match="refused"):
            for chunk in remote.stream("abc"):
                seen.append(chunk)
        assert seen == ["fine"]
    assert not marker.exists()


ROGUE_STDIO = """
import sys
from worker import protocol as P
command, payload = sys.argv[1].encode(), bytes.fromhex(sys.argv[2])
out = sys.stdout.buffer
sys.stdin.buffer.readline()
out.write(P.stdio_line(P.READY, P.encode_json(P.environment()))); out.flush()
sys.stdin.buffer.readline()
if command == P.ERROR:
    out.write(P.stdio_line(P.ERROR, b"", P.E_REMOTE, b"boom", payload))
else:
    out.write(P.stdio_line(command, payload))
out.flush()
"""


class RogueLauncher:
    """Launches a one-shot 'worker' that answers the task with a hostile payload."""

    def __init__(self, command: bytes, payload: bytes) -> None:
        self.command, self.payload = command, payload

    def launch(self, deadline: float | None) -> ProcessChannel:
        proc = subprocess.Popen(
            [sys.executable, "-c", ROGUE_STDIO, self.command.decode(), self.payload.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return ProcessChannel(proc)


@pytest.mark.parametrize("command", [P.RESULT, P.ERROR, P.CHUNK], ids=["result", "error", "chunk"])
def test_a_rogue_ephemeral_worker_cannot_run_code_in_the_client(command, tmp_path):
    marker = tmp_path / "pwned"
    blob, digest = encode_runnable(RunnableLambda(len))
    call = RemoteCall(blob, digest, encode_input("abc", {}), timeout=20)
    backend = EphemeralBackend(RogueLauncher(command, HOSTILE["os.system"](marker)))
    with pytest.raises(SerializationError, match="refused"):
        if command == P.CHUNK:
            list(backend.stream(call))
        else:
            backend.invoke(call)
    assert not marker.exists()
