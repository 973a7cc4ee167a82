"""The codec carries what cloudpickle alone cannot (docs/design.md#serialization), keeps secrets out of the
bytes, and says what to change when something cannot travel."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

from worker import codec, result_codec

SECRET = "sk-client-side-secret-123"


def seed_chain(api_key: str = SECRET):
    suffix = "!"  # captured in a closure: must travel by value
    prompt = ChatPromptTemplate.from_messages([("user", "Tell me about {pokemon}")])
    shout = RunnableLambda(lambda value: value.to_messages()[0].content + suffix)
    return prompt | shout | ChatOpenAI(model="gpt-4o-mini", api_key=api_key) | StrOutputParser()


def test_cloudpickle_alone_cannot_carry_chatopenai():
    import cloudpickle

    with pytest.raises(TypeError, match="pickle"):
        cloudpickle.dumps(ChatOpenAI(model="gpt-4o-mini", api_key=SECRET))


def test_chatopenai_travels_as_data_without_its_api_key():
    data = codec.dumps(ChatOpenAI(model="gpt-4o-mini", api_key=SECRET))
    assert SECRET.encode() not in data
    assert b"OPENAI_API_KEY" in data  # a reference resolved on the receiving side


def test_mixed_chain_is_rebuilt_in_another_process_with_that_process_key():
    data = codec.dumps(seed_chain())
    program = (
        "import sys; from worker import codec; chain = codec.loads(sys.stdin.buffer.read()); "
        "llm = chain.steps[2]; "
        "prompt_value = chain.steps[1].invoke(chain.steps[0].invoke({'pokemon': 'Pikachu'})); "
        "print(type(llm).__name__, llm.openai_api_key.get_secret_value(), prompt_value)"
    )
    env = {**os.environ, "OPENAI_API_KEY": "sk-from-the-worker-env"}
    out = subprocess.run([sys.executable, "-c", program], input=data, capture_output=True, env=env, timeout=60,
                         check=True)
    assert out.stdout.decode().split(" ", 2) == ["ChatOpenAI", "sk-from-the-worker-env", "Tell me about Pikachu!\n"]


def _adder(n: int) -> RunnableLambda:
    def adder(x: int) -> int:
        return x + n
    return RunnableLambda(adder)


def test_same_runnable_encodes_to_the_same_digest():
    chain = seed_chain()
    assert codec.digest(codec.dumps(chain)) == codec.digest(codec.dumps(chain))


def test_the_digest_names_a_runnables_content_not_its_type_or_name():
    """The broker routes and workers cache by digest: two runnables that differ only in what their
    closure holds must never share one, or a worker would run the other's code."""
    one, two = _adder(1), _adder(2)
    assert one.get_name() == two.get_name()
    assert codec.digest(codec.dumps(one)) != codec.digest(codec.dumps(two))
    assert codec.digest(codec.dumps(one)) == codec.digest(codec.dumps(_adder(1)))


def test_live_resources_give_a_codec_error_naming_the_type():
    with pytest.raises(codec.CodecError, match="lock"):
        codec.dumps({"lock": threading.Lock()})


def test_garbage_gives_a_codec_error():
    with pytest.raises(codec.CodecError, match="cannot deserialize"):
        codec.loads(b"not a pickle")


def test_builtin_exception_is_rebuilt_with_remote_traceback():
    try:
        {}["missing"]
    except KeyError as exc:
        info = codec.load_exception(codec.dump_exception(exc))
    assert isinstance(info.exception, KeyError)
    assert "missing" in info.exception.remote_traceback


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def test_exception_with_a_demanding_init_is_rebuilt_without_calling_it():
    # The data route rebuilds exceptions from their args and attributes, never through __init__.
    try:
        raise NeedsTwoArgs(1, 2)
    except NeedsTwoArgs as exc:
        info = codec.load_exception(codec.dump_exception(exc))
    assert type(info.exception) is NeedsTwoArgs
    assert str(info.exception) == "1/2"


def test_exception_that_cannot_be_rebuilt_keeps_its_type_name_and_traceback():
    class LocalError(Exception):  # not importable by name on the other side
        pass

    try:
        raise LocalError("boom")
    except LocalError as exc:
        info = codec.load_exception(codec.dump_exception(exc))
    assert info.exception is None
    assert info.type_name.endswith("LocalError")
    assert "raise LocalError" in info.traceback


def test_the_way_back_is_the_result_codec_with_no_pickle_in_it():
    # worker.codec re-exports the result codec's names, so callers of either direction use one module.
    assert codec.dumps_result is result_codec.dumps_result and codec.loads_result is result_codec.loads_result
    assert codec.CodecError is result_codec.CodecError and issubclass(codec.Refused, codec.CodecError)
    data = codec.dumps_output({"n": 1, "t": (1, 2)}, trusted=False)
    assert codec.loads_output(data, trusted=False) == {"n": 1, "t": (1, 2)}
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)
    with pytest.raises(codec.Refused, match="pickle"):  # nor does the client decode one as a result
        codec.loads_output(pickle.dumps({"n": 1}), trusted=False)
    assert codec.loads_output(codec.dumps_output(len, trusted=True), trusted=True) is len


# ---------------------------------------------------------------------------- the data fast path


def test_data_takes_the_c_pickler_and_comes_back_equal():
    from langchain_core.messages import AIMessageChunk

    chunk = AIMessageChunk(content="Pika", id="run-1")
    data = codec.dumps({"chunk": chunk, "n": 1})
    assert b"_rebuild_langchain_object" not in data  # not the dumpd route
    assert codec.loads(data) == {"chunk": chunk, "n": 1}


def test_runnables_keep_the_hybrid_route_even_inside_data():
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    assert b"_rebuild_langchain_object" in codec.dumps(prompt)
    data = codec.dumps({"chain": seed_chain()})  # a runnable holding a secret, nested in data
    assert SECRET.encode() not in data and b"OPENAI_API_KEY" in data


def test_objects_from_main_still_travel_by_value():
    # Defined in __main__ of one process, rebuilt in another whose __main__ does not have them.
    program = (
        "import sys\n"
        "from worker import codec\n"
        "class Point:\n"
        "    def __init__(self, x): self.x = x\n"
        "def double(v): return 2 * v\n"
        "sys.stdout.buffer.write(codec.dumps({'p': Point(21), 'f': double}))\n"
    )
    data = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=True).stdout
    reader = "import sys; from worker import codec; v = codec.loads(sys.stdin.buffer.read()); print(v['f'](v['p'].x))"
    out = subprocess.run([sys.executable, "-c", reader], input=data, capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().strip() == "42"


def test_modules_registered_by_value_still_travel_by_value(tmp_path):
    # A module only the client has, registered with cloudpickle.register_pickle_by_value: a value
    # naming it must be carried by value, as cloudpickle alone would.
    (tmp_path / "client_only_mod.py").write_text("class Point:\n    def __init__(self, x): self.x = x\n")
    program = (
        "import sys, cloudpickle\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import client_only_mod\n"
        "cloudpickle.register_pickle_by_value(client_only_mod)\n"
        "from worker import codec\n"
        "sys.stdout.buffer.write(codec.dumps([client_only_mod.Point(42)]))\n"
    )
    data = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=True).stdout
    reader = "import sys; from worker import codec; print(codec.loads(sys.stdin.buffer.read())[0].x)"
    out = subprocess.run([sys.executable, "-c", reader], input=data, capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().strip() == "42"


# ---------------------------------------------------------------------------- module-level sentinels


class _SentinelRef:
    """Pickles as the codec's sentinel reference with any names: what a hostile sender can write."""

    def __init__(self, *names):
        self.names = names

    def __reduce__(self):
        return codec._sentinel, self.names


@pytest.mark.timeout(60)
def test_a_module_level_sentinel_travels_by_reference_and_stays_itself():
    import inspect

    data = codec.dumps([inspect._sentinel, inspect._sentinel])
    assert b"_sentinel" in data and b"inspect" in data
    first, second = codec.loads(data)
    assert first is inspect._sentinel and second is inspect._sentinel
    local = object()  # not module-level: by value, as before
    assert type(codec.loads(codec.dumps(local))) is object


@pytest.mark.timeout(60)
def test_a_module_imported_after_the_first_scan_is_indexed_too(tmp_path, monkeypatch):
    import inspect

    codec.dumps(inspect._sentinel)  # the index exists now
    (tmp_path / "late_sentinel_mod.py").write_text("LATE = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_sentinel_mod", raising=False)
    import late_sentinel_mod

    data = codec.dumps({"x": late_sentinel_mod.LATE})
    assert b"late_sentinel_mod" in data
    assert codec.loads(data)["x"] is late_sentinel_mod.LATE


@pytest.mark.timeout(60)
def test_sentinels_of_main_and_of_modules_pickled_by_value_still_travel_by_value(tmp_path):
    (tmp_path / "by_value_sentinels.py").write_text("TOKEN = object()\n")
    program = (
        "import sys, cloudpickle\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import by_value_sentinels\n"
        "cloudpickle.register_pickle_by_value(by_value_sentinels)\n"
        "from worker import codec\n"
        "MAIN_TOKEN = object()\n"
        "t = by_value_sentinels.TOKEN\n"
        "sys.stdout.buffer.write(codec.dumps([t, t, MAIN_TOKEN, lambda x: x is MAIN_TOKEN]))\n"
    )
    data = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=True).stdout
    reader = ("import sys; from worker import codec; a, b, m, f = codec.loads(sys.stdin.buffer.read()); "
              "print(a is b, type(a) is object, f(m))")
    out = subprocess.run([sys.executable, "-c", reader], input=data, capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().split() == ["True", "True", "True"]  # identity kept within one payload


@pytest.mark.timeout(60)
def test_scanning_for_sentinels_imports_nothing_and_leaves_lazy_modules_unloaded(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "lazy_sentinel_mod.py").write_text("import sys\nsys.modules['lazy_was_loaded'] = sys\nX = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_sentinel_mod", raising=False)
    monkeypatch.delitem(sys.modules, "lazy_was_loaded", raising=False)
    spec = importlib.util.find_spec("lazy_sentinel_mod")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lazy_sentinel_mod"] = module
    spec.loader.exec_module(module)  # registered, not executed yet
    codec.dumps([object(), RunnableLambda(lambda x: x)])  # meets an unknown object(): a scan
    assert "lazy_was_loaded" not in sys.modules


@pytest.mark.timeout(60)
@pytest.mark.parametrize("names, says", [
    ((("os", "system"),), "not a module-level object()"),            # a function: refused, not called
    ((("os", "path"),), "not a module-level object()"),              # a module
    ((("os.path", "join"),), "not a module-level object()"),
    ((("os", "path.join"),), "not a module attribute name"),         # no attribute chains
    ((("builtins", "__import__"),), "not a module-level object()"),
    ((("__main__", "x"),), "not a module attribute name"),
    ((("os;rm", "x"),), "not a module attribute name"),
    ((("no_such_module_for_rk8s", "X"),), "cannot be found on this side"),
    ((("inspect", "no_such_attribute"),), "cannot be found on this side"),
    ((), "malformed"),
    ((("inspect", "_sentinel"),) * 5, "malformed"),
    (("inspect", "_sentinel"), "malformed"),                         # not pairs
    (((b"inspect", "_sentinel"),), "malformed"),
])
def test_hostile_sentinel_references_are_refused(names, says):
    import pickle

    with pytest.raises(codec.CodecError, match=says):
        codec.loads(pickle.dumps(_SentinelRef(*names)))


@pytest.mark.timeout(60)
def test_a_sentinel_reference_resolves_the_first_name_it_can():
    import inspect
    import pickle

    payload = pickle.dumps(_SentinelRef(("no_such_module_for_rk8s", "X"), ("inspect", "_sentinel")))
    assert codec.loads(payload) is inspect._sentinel


# ---------------------------------------------------------------------------- the names pickles travel by


def test_what_a_pickle_calls_on_the_receiving_side_keeps_its_worker_codec_name():
    # A worker of another release rebuilds what this client sends: the two functions a pickle
    # names must stay importable as worker.codec._sentinel and worker.codec._rebuild_langchain_object.
    import inspect

    sentinel = codec.dumps(inspect._sentinel)
    chat = codec.dumps(ChatOpenAI(model="gpt-4o-mini", api_key=SECRET))
    assert b"worker.codec" in sentinel and b"_sentinel" in sentinel and b"worker.sentinels" not in sentinel
    assert b"worker.codec" in chat and b"_rebuild_langchain_object" in chat and b"langchain_route" not in chat
    assert codec.loads(sentinel) is inspect._sentinel


# ---------------------------------------------------------------------------- errors a user can act on


def test_a_runnable_holding_an_open_file_is_refused_with_what_to_do_instead(tmp_path):
    from pool.client.calls import encode_runnable
    from pool.errors import SerializationError

    path = tmp_path / "notes.txt"
    path.write_text("what the file held when the runnable was sent")
    with open(path) as f:
        reads_a_file = RunnableLambda(lambda _: f.read())
        # cloudpickle alone sends a snapshot of the contents: the worker would read stale data.
        with pytest.raises(SerializationError) as info:
            encode_runnable(reads_a_file)
        with pytest.raises(codec.CodecError):
            codec.dumps(RunnableLambda(lambda _, handle=f: handle.read()))  # a default argument too
    message = str(info.value)
    assert "open file" in message and str(path) in message
    assert "cannot be sent" in message and "inside the function" in message and "on the worker" in message


def test_in_memory_files_still_travel():
    import io

    buffer = io.StringIO("in memory")
    rebuilt = codec.loads(codec.dumps(RunnableLambda(lambda _: buffer.getvalue())))
    assert rebuilt.invoke("x") == "in memory"
    assert codec.loads(codec.dumps({"bytes": io.BytesIO(b"data")}))["bytes"].getvalue() == b"data"


def test_an_input_that_is_not_data_names_its_path_and_type_with_advice_for_inputs():
    with pytest.raises(codec.CodecError) as info:
        codec.dumps_input({"a": {"b": threading.Lock()}}, {})
    message = str(info.value)
    assert 'input["a"]["b"]' in message and "_thread.lock" in message
    assert "send plain values" in message and "on the worker" in message
    assert "tuple" not in message and "inside the runnable instead" not in message  # not the runnables' advice


@pytest.mark.parametrize(("encode", "where"), [
    (lambda: codec.dumps_batch_input([1, {"ok": 2}, {"q": [0, threading.Lock()]}], {}), 'inputs[2]["q"][1]'),
    (lambda: codec.dumps_input("fine", {"callback": threading.Lock()}), 'kwargs["callback"]'),
    (lambda: codec.dumps_input([{"x": 1}, threading.Event()], {}), "input[1]"),  # not the lock inside it
])
def test_the_path_reaches_into_lists_batches_kwargs_and_objects(encode, where):
    with pytest.raises(codec.CodecError, match=r"cannot be serialized|open file") as info:
        encode()
    assert str(info.value).startswith(where + " is a ")


def test_an_input_encodes_to_the_bytes_it_always_had():
    value, kwargs = {"a": [1, 2.5, "x"]}, {"stop": ["\n"]}
    assert codec.dumps_input(value, kwargs) == codec.dumps((value, kwargs))
    assert codec.dumps_batch_input([value, value], kwargs) == codec.dumps(([value, value], kwargs))


def test_data_that_cannot_travel_names_the_part_that_cannot():
    with pytest.raises(codec.CodecError, match=r'value\[0\]\["a"\]\["b"\] is a _thread.lock'):
        codec.dumps(({"a": {"b": threading.Lock()}}, {}))
