"""The seed project's own chain, end to end: prompt | RunnableK8s(bound=ChatOpenAI) | parser.

The OpenAI API is a local OpenAI-compatible server (tests/support/fake_openai.py). The client
builds ChatOpenAI with a key the server refuses; the workers hold the right one in their
environment, so a passing call proves the key came from the worker side (docs/design.md#serialization).
"""

from __future__ import annotations

import threading

import pytest
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from pool import RunnableK8s
from tests.support.fake_openai import DEFAULT_CHUNKS

pytestmark = pytest.mark.timeout(60)

ANSWER = "".join(DEFAULT_CHUNKS)


def seed_chain(fake_openai, local_pool, **kwargs):
    prompt = ChatPromptTemplate.from_messages([("system", "You are a Pokémon expert."), ("user", "{question}")])
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-client-key-the-server-refuses")
    return prompt | RunnableK8s(bound=llm, pool=local_pool.address, **kwargs) | StrOutputParser()


def test_invoke_uses_the_workers_api_key(fake_openai, local_pool):
    assert seed_chain(fake_openai, local_pool).invoke({"question": "What is Pikachu?"}) == ANSWER
    assert fake_openai.requests[-1]["messages"][-1]["content"] == "What is Pikachu?"


def test_the_same_chain_locally_is_refused_by_the_server(fake_openai):
    import openai

    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-client-key-the-server-refuses")
    with pytest.raises(openai.AuthenticationError):
        llm.invoke("hi")


def test_stream_yields_several_chunks_as_the_model_produces_them(fake_openai, local_pool):
    gate = threading.Event()
    fake_openai.set_chunk_gate(gate)  # the server holds the last chunk until we open the gate
    try:
        stream = seed_chain(fake_openai, local_pool).stream({"question": "What is Pikachu?"})
        first = next(stream)
        gate.set()
        chunks = [first, *stream]
    finally:
        fake_openai.set_chunk_gate(None)
    assert len([c for c in chunks if c]) >= 3
    assert "".join(chunks) == ANSWER


def test_batch(fake_openai, local_pool):
    questions = [{"question": f"Pokémon #{i}?"} for i in range(6)]
    assert seed_chain(fake_openai, local_pool).batch(questions) == [ANSWER] * 6


async def test_async_paths(fake_openai, local_pool):
    chain = seed_chain(fake_openai, local_pool)
    assert await chain.ainvoke({"question": "a"}) == ANSWER
    assert "".join([c async for c in chain.astream({"question": "b"})]) == ANSWER
    assert await chain.abatch([{"question": "c"}, {"question": "d"}]) == [ANSWER, ANSWER]


def test_bind_tools_stays_remote(fake_openai, local_pool):
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-refused")
    wrapped = RunnableK8s(bound=llm, pool=local_pool.address)

    def get_pokemon_type(name: str) -> str:
        """Look up a Pokémon's type."""
        return "Electric"

    with_tools = wrapped.bind_tools([get_pokemon_type])
    assert isinstance(with_tools, RunnableK8s)
    message = with_tools.invoke("What type is Pikachu?")  # a local call would be refused (wrong key)
    assert isinstance(message, AIMessage)
    assert message.tool_calls[0]["name"] == "get_pokemon_type"


class Pokemon(BaseModel):
    name: str
    type: str


def test_with_structured_output_stays_remote(fake_openai, local_pool):
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-refused")
    structured = RunnableK8s(bound=llm, pool=local_pool.address).with_structured_output(Pokemon)
    assert isinstance(structured, RunnableK8s)
    result = structured.invoke("Describe Pikachu")
    assert isinstance(result, Pokemon)
