"""The codec carries what cloudpickle alone cannot (DESIGN §3), and keeps secrets out of the bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

from worker import codec

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


def test_same_runnable_encodes_to_the_same_digest():
    chain = seed_chain()
    assert codec.digest(codec.dumps(chain)) == codec.digest(codec.dumps(chain))


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
