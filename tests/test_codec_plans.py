"""The result codec's per-class caches (worker.result_codec): an encoder plan per model class on the
worker, a decode shape per class name on the client. A streamed token's class is the same for
every token, so each is made once; these tests prove that a cache never answers for another class
(two classes of one name in different modules; a class replaced in its module, a module reloaded
or imported again; a model rebuilt with other fields; a hostile message naming a class with a
field list that is not its own) and that what the client decodes equals what the worker encoded:
the same class, the same values and the same fields set.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import types
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

from pool.bench import fake_llm
from tests.support.remote import remote
from worker.result_codec import MARKER, MODEL, CodecError, dumps_result, loads_result

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- helpers


def assert_same(decoded: Any, original: Any, where: str = "value") -> None:
    """``decoded`` is ``original`` again: equal, of the same type, with the same fields set, all the
    way down (a pydantic model's == ignores its fields set)."""
    assert type(decoded) is type(original), f"{where}: {type(decoded)} is not {type(original)}"
    assert decoded == original, f"{where}: {decoded!r} != {original!r}"
    if isinstance(original, BaseModel):
        assert decoded.model_fields_set == original.model_fields_set, where
        assert decoded.__pydantic_extra__ == original.__pydantic_extra__, where
        for key, value in original.__dict__.items():
            assert_same(decoded.__dict__[key], value, f"{where}.{key}")
    elif isinstance(original, dict):
        assert list(decoded) == list(original), where
        for key, value in original.items():
            assert_same(decoded[key], value, f"{where}[{key!r}]")
    elif isinstance(original, (list, tuple)):
        for i, (left, right) in enumerate(zip(decoded, original, strict=True)):
            assert_same(left, right, f"{where}[{i}]")


def round_trip(value: Any) -> Any:
    decoded = loads_result(dumps_result(value))
    assert_same(decoded, value)
    return decoded


@pytest.fixture
def modules() -> Iterator[dict[str, types.ModuleType]]:
    """Modules made for one test, imported (in sys.modules) for its duration only."""
    made: dict[str, types.ModuleType] = {}

    yield made

    for name in made:
        sys.modules.pop(name, None)


def new_module(made: dict[str, types.ModuleType], source: str) -> types.ModuleType:
    """A module named for this test (unique per call) whose classes are defined by ``source``."""
    name = f"rk8s_plans_{uuid.uuid4().hex}"
    return load_module(made, name, source)


def load_module(made: dict[str, types.ModuleType], name: str, source: str) -> types.ModuleType:
    """``source`` run as module ``name``, put in sys.modules (replacing any module of that name)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    made[name] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


TOKEN_A = "from pydantic import BaseModel\nclass Token(BaseModel):\n    text: str\n    index: int = 0\n"
TOKEN_B = ("from pydantic import BaseModel\nclass Token(BaseModel):\n    label: str\n    score: float = 0.0\n"
           "    extra_b: list = []\n")


def streamed_tokens(tokens: int = 5) -> list[Any]:
    """The chunks LangChain's own astream of the bench's fake chat model yields."""

    async def collect() -> list[Any]:
        return [chunk async for chunk in fake_llm.build(median_ms=0.0, tokens=tokens).astream("hello")]

    return asyncio.run(collect())


def full_chunk(index: int = 0) -> AIMessageChunk:
    return AIMessageChunk(
        content=[{"type": "text", "text": f"Pika{index}"}], id=f"run-{index}",
        response_metadata={"model_name": "fake", "finish_reason": "tool_calls", "logprobs": None},
        usage_metadata={"input_tokens": 12, "output_tokens": 3, "total_tokens": 15,
                        "output_token_details": {"reasoning": 1}},
        tool_call_chunks=[{"name": "search", "args": '{"q": "pik', "id": "call_1", "index": 0},
                          {"name": None, "args": 'a"}', "id": None, "index": 0}],
        additional_kwargs={"refusal": None})


# ---------------------------------------------------------------------- values come back the same


def test_every_token_the_fake_chat_model_streams_comes_back_the_same():
    chunks = streamed_tokens()
    assert len(chunks) >= 5 and all(type(chunk) is AIMessageChunk for chunk in chunks)
    for chunk in chunks:
        round_trip(chunk)


def test_a_chunk_with_tool_call_chunks_usage_response_metadata_and_an_id_comes_back_the_same():
    for index in range(3):  # the first encodes through a new plan, the others through the cached one
        decoded = round_trip(full_chunk(index))
        assert decoded.tool_call_chunks[0]["args"] == '{"q": "pik' and decoded.usage_metadata["total_tokens"] == 15
        assert decoded.id == f"run-{index}" and "usage_metadata" in decoded.model_fields_set


def test_chunks_summed_into_one_come_back_the_same():
    total = full_chunk(0) + full_chunk(1)
    assert total.tool_call_chunks and total.tool_calls is not None
    round_trip(total)
    chunks = streamed_tokens()
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed = streamed + chunk
    round_trip(streamed)


def test_models_inside_dicts_lists_and_documents_come_back_the_same():
    value = {
        "docs": [Document(page_content="Pikachu", metadata={"source": "dex", "n": 25}, id="d1"),
                 Document(page_content="Raichu")],
        "messages": [HumanMessage(content="hi", name="ash"), AIMessage(content="hello", id="a1"),
                     ToolMessage(content="42", tool_call_id="call_1"), full_chunk(2)],
        "nested": [[{"chunk": full_chunk(3)}], (1, "two", None)],
        "plain": {"a": [1, 2.5, True, None, b"raw"]},
    }
    round_trip(value)
    round_trip([full_chunk(4), full_chunk(5)])
    round_trip(Document(page_content="x" * 1000, metadata={"deep": {"list": [1, {"k": "v"}]}}))


def test_an_instance_whose_values_are_in_another_order_than_its_class_fields_comes_back_the_same():
    chunk = full_chunk(0)
    dumps_result(chunk)  # the class's plan exists
    odd = chunk.model_copy()
    object.__setattr__(odd, "__dict__", dict(reversed(list(chunk.__dict__.items()))))
    assert list(odd.__dict__) != list(AIMessageChunk.model_fields)
    round_trip(odd)


def test_a_model_with_extra_values_and_extra_values_set_comes_back_the_same(modules):
    module = new_module(modules, "from pydantic import BaseModel, ConfigDict\n"
                                 "class Open(BaseModel):\n    model_config = ConfigDict(extra='allow')\n"
                                 "    a: int = 0\n    b: str = ''\n")
    for _ in range(2):
        value = module.Open(a=1, surprise=[1, 2])
        decoded = round_trip(value)
        assert decoded.surprise == [1, 2] and decoded.model_fields_set == {"a", "surprise"}


# ---------------------------------------------------------------------- a cache answers only for its class


def test_two_classes_of_one_name_in_two_modules_each_come_back_as_themselves(modules):
    first = new_module(modules, TOKEN_A)
    second = new_module(modules, TOKEN_B)
    assert first.Token.__qualname__ == second.Token.__qualname__ == "Token"
    for _ in range(2):  # the second time from the caches
        a = round_trip(first.Token(text="pika", index=3))
        b = round_trip(second.Token(label="chu", score=0.5))
        assert type(a) is first.Token and type(b) is second.Token
        assert b.extra_b == [] and "extra_b" not in b.model_fields_set


def test_a_class_replaced_in_its_module_is_found_afresh(modules):
    module = new_module(modules, TOKEN_A)
    old = module.Token
    data = dumps_result(old(text="pika", index=1))
    assert type(loads_result(data)) is old  # cached now
    exec(compile(TOKEN_A, "<replacement>", "exec"), module.__dict__)
    assert module.Token is not old
    decoded = loads_result(data)
    assert type(decoded) is module.Token, "the decode cache answered with the class the name no longer names"
    assert decoded.text == "pika" and decoded.model_fields_set == {"text", "index"}


def test_a_module_imported_again_is_found_afresh(modules):
    module = new_module(modules, TOKEN_A)
    data = dumps_result(module.Token(text="pika"))
    assert type(loads_result(data)) is module.Token
    again = load_module(modules, module.__name__, TOKEN_A)  # a new module object of the same name
    assert again is not module and again.Token is not module.Token
    assert type(loads_result(data)) is again.Token


def test_an_enum_replaced_in_its_module_is_found_afresh(modules):
    source = "import enum\nclass Colour(enum.Enum):\n    RED = 1\n    BLUE = 2\n"
    module = new_module(modules, source)
    data = dumps_result(module.Colour.RED)
    assert loads_result(data) is module.Colour.RED
    old = module.Colour
    exec(compile(source, "<replacement>", "exec"), module.__dict__)
    assert module.Colour is not old and loads_result(data) is module.Colour.RED


def test_a_model_rebuilt_with_another_field_decodes_with_its_new_fields(modules):
    module = new_module(modules, TOKEN_A)
    cls = module.Token
    old_data = dumps_result(cls(text="pika", index=2))
    assert loads_result(old_data).index == 2  # the shape of (text, index) is cached now
    cls.__pydantic_fields__["rarity"] = FieldInfo(annotation=int, default=7)
    cls.model_rebuild(force=True)
    assert list(cls.model_fields) == ["text", "index", "rarity"]
    # A worker of the old class sends (text, index): the client's class now has rarity too, which
    # takes its default as model_construct gives it, not an instance missing the field.
    decoded = loads_result(old_data)
    assert type(decoded) is cls and decoded.rarity == 7 and decoded.__dict__["rarity"] == 7
    assert decoded.model_fields_set == {"text", "index"}
    # The worker's encoder plan was made for two fields; an instance of the rebuilt class has three.
    round_trip(cls(text="chu", index=3, rarity=9))
    round_trip(cls(text="chu"))


def test_a_model_rebuilt_with_an_alias_stops_taking_the_plain_path(modules):
    module = new_module(modules, "from pydantic import BaseModel\nclass Card(BaseModel):\n    name: str = ''\n")
    cls = module.Card
    data = dumps_result(cls(name="pika"))
    assert loads_result(data).name == "pika"
    cls.__pydantic_fields__["name"] = FieldInfo(annotation=str, default="", alias="title")
    cls.model_rebuild(force=True)
    # model_construct looks a field up by its alias first, then by its name: still "pika".
    decoded = loads_result(data)
    assert type(decoded) is cls and decoded.name == "pika" and decoded.model_fields_set == {"name"}


def hostile(name: str, fields: str, values: list[Any], mask: int = 0, extra: Any = None,
            set_extra: Any = None) -> bytes:
    """A model message as a hostile worker can write it: any class name, any field list."""
    return msgpack.packb([MARKER, [name, None, fields, values, mask, set_extra, extra, None], MODEL])


def class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def test_a_message_naming_a_class_with_another_class_fields_makes_only_the_named_class(modules):
    first = new_module(modules, TOKEN_A)
    second = new_module(modules, TOKEN_B)
    round_trip(first.Token(text="pika"))
    round_trip(second.Token(label="chu"))
    # first's class, second's field list and values: first's Token, with none of second's fields.
    data = hostile(class_ref(first.Token), "label,score,extra_b", ["evil", 1.0, ["x"]], mask=0b111)
    decoded = loads_result(data)
    assert type(decoded) is first.Token
    assert not {"label", "score", "extra_b"} & (decoded.__dict__.keys() | decoded.model_fields_set)
    assert decoded.__pydantic_extra__ is None
    # Neither cache was changed by it: both classes still come back as themselves.
    round_trip(first.Token(text="pika", index=4))
    round_trip(second.Token(label="chu", score=2.0, extra_b=[1]))


def test_a_message_naming_a_chunk_with_a_field_list_not_its_own_changes_neither_class_nor_cache():
    round_trip(full_chunk(0))
    config = dict(AIMessageChunk.model_config)
    name = class_ref(AIMessageChunk)
    decoded = loads_result(hostile(name, "content,__class__,model_config", ["hi", "x", {"extra": "forbid"}],
                                   mask=0b111))
    # A message keeps extra values (its class says extra="allow"): the names come back as extra
    # values of this one instance, never as its class, its attributes or its class's config.
    assert type(decoded) is AIMessageChunk and decoded.content == "hi"
    assert decoded.__class__ is AIMessageChunk and "__class__" not in decoded.__dict__
    assert dict(AIMessageChunk.model_config) == config
    assert decoded.model_fields_set <= {"content", "__class__", "model_config"}
    round_trip(full_chunk(1))


@pytest.mark.parametrize("fields, values, mask", [
    ("content,additional_kwargs", ["hi"], 0),  # fewer values than names
    ("content", ["hi", "more"], 0),  # more values than names
    ("content", ["hi"], 0b10),  # a bit beyond the names
    ("content,not an identifier", ["hi", 1], 0),
    (7, ["hi"], 0),  # not a field list at all
])
def test_a_message_whose_fields_and_values_do_not_match_is_refused(fields, values, mask):
    with pytest.raises(CodecError):
        loads_result(hostile(class_ref(AIMessageChunk), fields, values, mask=mask))
    round_trip(full_chunk(0))


def test_the_class_own_field_list_with_a_wrong_number_of_values_is_refused():
    fields = ",".join(AIMessageChunk.model_fields)
    with pytest.raises(CodecError):
        loads_result(hostile(class_ref(AIMessageChunk), fields, ["hi"]))
    with pytest.raises(CodecError):  # every field, and a mask naming one more
        loads_result(hostile(class_ref(AIMessageChunk), fields, [None] * len(AIMessageChunk.model_fields),
                             mask=1 << len(AIMessageChunk.model_fields)))
    round_trip(full_chunk(0))


def test_an_extra_value_set_must_be_an_extra_value_sent(modules):
    module = new_module(modules, "from pydantic import BaseModel, ConfigDict\n"
                                 "class Open(BaseModel):\n    model_config = ConfigDict(extra='allow')\n"
                                 "    a: int = 0\n")
    with pytest.raises(CodecError):
        loads_result(hostile(class_ref(module.Open), "a", [1], set_extra=["ghost"], extra={"other": 1}))


# ---------------------------------------------------------------------- through a real pool


class Pokemon(enum.Enum):
    PIKACHU = 25


class Sighting(BaseModel):
    model_config = ConfigDict(frozen=True)

    who: Pokemon
    where: str = "forest"


def test_a_real_worker_streams_the_fake_chat_model_tokens_back_the_same(local_pool):
    model = fake_llm.build(median_ms=5.0, tokens=8)
    expected = streamed_tokens(8)
    remote_model = remote(local_pool, model)
    for _ in range(2):
        received = list(remote_model.stream("hello"))
        assert len(received) == len(expected)
        for got, want in zip(received, expected, strict=True):
            # The run id differs per call; everything else, and which fields were set, is the same.
            assert got.id and want.id
            assert_same(got.model_copy(update={"id": None}), want.model_copy(update={"id": None}))


def test_a_real_worker_sends_chunks_with_tool_calls_and_models_back_the_same(local_pool):
    async def produce(_: Any) -> Any:
        yield full_chunk(0)
        yield {"sighting": Sighting(who=Pokemon.PIKACHU), "doc": Document(page_content="dex", id="d")}
        yield full_chunk(1)

    from langchain_core.runnables import RunnableGenerator

    received = list(remote(local_pool, RunnableGenerator(produce)).stream(None))
    assert len(received) == 3
    assert_same(received[0], full_chunk(0))
    assert_same(received[1], {"sighting": Sighting(who=Pokemon.PIKACHU), "doc": Document(page_content="dex", id="d")})
    assert_same(received[2], full_chunk(1))
