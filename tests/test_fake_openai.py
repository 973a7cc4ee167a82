"""The fake OpenAI server speaks the real wire format: checked with the real clients."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from langchain_core.messages import AIMessageChunk, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.support.fake_openai import DEFAULT_CHUNKS, FakeOpenAI

ANSWER = "".join(DEFAULT_CHUNKS)


def _llm(fake: FakeOpenAI, **kwargs) -> ChatOpenAI:
    kwargs.setdefault("api_key", fake.api_key)
    return ChatOpenAI(base_url=fake.base_url, model="gpt-4o-mini", max_retries=0, timeout=10,
                      **kwargs)


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def _fake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fake-openai-") and t.is_alive()]


@pytest.mark.timeout(30)
def test_invoke_returns_joined_text_and_records_request(fake):
    message = _llm(fake).invoke("What is Pikachu?")
    assert message.content == ANSWER
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["model_name"] == "gpt-4o-mini"
    assert message.usage_metadata["output_tokens"] == len(DEFAULT_CHUNKS)
    assert len(fake.requests) == 1
    body = fake.requests[0]
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [{"role": "user", "content": "What is Pikachu?"}]
    assert not body.get("stream")


@pytest.mark.timeout(30)
def test_seed_chain_with_prompt_and_parser(fake):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a Pokémon expert."), ("human", "Question: {input}")]
    )
    chain = prompt | _llm(fake) | StrOutputParser()
    assert chain.invoke({"input": "Pikachu?"}) == ANSWER
    assert chain.batch([{"input": "a"}, {"input": "b"}, {"input": "c"}]) == [ANSWER] * 3
    assert [m["role"] for m in fake.requests[0]["messages"]] == ["system", "user"]
    assert fake.requests[0]["messages"][1]["content"] == "Question: Pikachu?"


@pytest.mark.timeout(30)
def test_stream_yields_chunks_in_order(fake):
    chunks = list(_llm(fake).stream("What is Pikachu?"))
    texts = [c.content for c in chunks if c.content]
    assert texts == list(DEFAULT_CHUNKS)
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert fake.requests[-1]["stream"] is True
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.content == ANSWER
    assert merged.response_metadata.get("finish_reason") == "stop"


@pytest.mark.timeout(30)
def test_stream_usage_chunk_when_requested(fake):
    chunks = list(_llm(fake, stream_usage=True).stream("hi"))
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == len(DEFAULT_CHUNKS)
    assert "".join(c.content for c in chunks) == ANSWER


@pytest.mark.timeout(30)
async def test_astream_and_ainvoke(fake):
    llm = _llm(fake)
    texts = [c.content async for c in llm.astream("hi") if c.content]
    assert texts == list(DEFAULT_CHUNKS)
    assert (await llm.ainvoke("hi")).content == ANSWER
    results = await asyncio.gather(*(llm.ainvoke(f"q{i}") for i in range(5)))
    assert [r.content for r in results] == [ANSWER] * 5


@pytest.mark.timeout(30)
def test_wrong_key_raises_authentication_error(fake):
    with pytest.raises(openai.AuthenticationError) as info:
        _llm(fake, api_key="sk-wrong-key-1234").invoke("hi")
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        list(_llm(fake, api_key="sk-wrong-key-1234").stream("hi"))


@pytest.mark.timeout(30)
def test_raw_http_error_shape_and_models(fake):
    request = urllib.request.Request(
        fake.base_url + "/chat/completions",
        data=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        .encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 401
    error = json.loads(info.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"

    client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    try:
        ids = [m.id for m in client.models.list()]
        assert "gpt-4o-mini" in ids
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content == ANSWER
        assert completion.usage.total_tokens > 0
    finally:
        client.close()


@pytest.mark.timeout(30)
def test_gate_proves_chunks_arrive_incrementally(fake):
    gate = threading.Event()
    fake.set_chunk_gate(gate)
    safety = threading.Timer(10, gate.set)  # never hang, even if the stream were buffered
    safety.start()
    try:
        stream = _llm(fake).stream("What is Pikachu?")
        first = next(c for c in stream if c.content)
        # The server is still holding back the last chunk, yet the first one is here.
        assert not gate.is_set(), "the first chunk only arrived after the gate opened"
        assert first.content == DEFAULT_CHUNKS[0]
        gate.set()
        rest = [c.content for c in stream if c.content]
    finally:
        safety.cancel()
    assert [first.content, *rest] == list(DEFAULT_CHUNKS)


@pytest.mark.timeout(30)
def test_chunk_delay_spreads_chunks_over_time():
    with FakeOpenAI(chunks=("a", "b", "c", "d"), chunk_delay=0.1) as fake:
        arrivals = []
        start = time.monotonic()
        for c in _llm(fake).stream("hi"):
            if c.content:
                arrivals.append((c.content, time.monotonic() - start))
    assert [t for t, _ in arrivals] == ["a", "b", "c", "d"]
    assert arrivals[-1][1] - arrivals[0][1] >= 0.25


@pytest.mark.timeout(30)
def test_bind_tools_returns_tool_calls(fake):
    class GetPokemon(BaseModel):
        """Look a Pokémon up by name."""

        name: str = Field(description="the Pokémon's name")
        generation: int
        shiny: bool = False

    llm = _llm(fake).bind_tools([GetPokemon])
    message = llm.invoke("Tell me about Pikachu")
    assert message.content == ""
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "GetPokemon"
    assert set(call["args"]) == {"name", "generation"}
    assert isinstance(call["args"]["generation"], int)
    assert call["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert fake.requests[-1]["tools"][0]["function"]["name"] == "GetPokemon"

    streamed = None
    for chunk in llm.stream("Tell me about Pikachu"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["GetPokemon"]
    assert set(streamed.tool_calls[0]["args"]) == {"name", "generation"}

    # Once the tool has answered, the model replies with text.
    answer = llm.invoke(
        ["Tell me about Pikachu", message,
         ToolMessage(content="Pikachu: Electric", tool_call_id=call["id"])]
    )
    assert answer.content == ANSWER and not answer.tool_calls


@pytest.mark.timeout(30)
def test_with_structured_output(fake):
    class Pokemon(BaseModel):
        name: str
        number: int

    result = _llm(fake).with_structured_output(Pokemon).invoke("Pikachu?")
    assert isinstance(result, Pokemon)
    assert result.number == 1


@pytest.mark.timeout(30)
def test_nothing_left_behind_after_exit():
    before = set(_fake_threads())
    with FakeOpenAI() as fake:
        host, port = fake.address
        llm = _llm(fake)
        assert llm.invoke("hi").content == ANSWER  # leaves a keep-alive connection open
        # An abandoned stream whose last chunk waits on a gate that never opens.
        fake.set_chunk_gate(threading.Event())
        stream = llm.stream("hi")
        next(c for c in stream if c.content)
        assert len(set(_fake_threads()) - before) >= 2  # server thread + connection threads
    deadline = time.monotonic() + 5
    while set(_fake_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (set(_fake_threads()) - before)
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    with pytest.raises(RuntimeError):
        _ = fake.base_url
    stream.close()


# -- embeddings ------------------------------------------------------------------------------------


def _embeddings_client(fake: FakeOpenAI, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key=key or fake.api_key, base_url=fake.base_url, max_retries=0, timeout=10)


@pytest.mark.timeout(30)
def test_embeddings_in_both_encodings_are_the_same_unit_vectors(fake):
    client = _embeddings_client(fake)
    as_floats = client.embeddings.create(model="text-embedding-3-small", input=["Pikachu", "Squirtle"],
                                         encoding_format="float")
    by_default = client.embeddings.create(model="text-embedding-3-small", input=["Pikachu", "Squirtle"])
    assert fake.embedding_requests[-1]["encoding_format"] == "base64"  # what the real client asks for
    assert [d.embedding for d in by_default.data] == [d.embedding for d in as_floats.data]
    assert [d.index for d in as_floats.data] == [0, 1]
    first = as_floats.data[0].embedding
    assert len(first) == 1536 and first == fake.embedding("Pikachu")
    assert first != as_floats.data[1].embedding
    assert abs(sum(v * v for v in first) - 1.0) < 1e-5
    assert as_floats.usage.prompt_tokens == 2 and as_floats.model == "text-embedding-3-small"


@pytest.mark.timeout(30)
def test_embeddings_dimensions_shorten_and_renormalize(fake):
    client = _embeddings_client(fake)
    short = client.embeddings.create(model="text-embedding-3-large", input="Pikachu", dimensions=8).data[0].embedding
    full = fake.embedding("Pikachu", "text-embedding-3-large")
    assert len(full) == 3072 and len(short) == 8
    assert short == fake.embedding("Pikachu", "text-embedding-3-large", dimensions=8)
    assert abs(sum(v * v for v in short) - 1.0) < 1e-5
    scale = short[0] / full[0]
    assert all(abs(s - f * scale) < 1e-5 for s, f in zip(short, full[:8], strict=True))
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="text-embedding-ada-002", input="Pikachu", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="text-embedding-3-small", input="Pikachu", dimensions=5000)


@pytest.mark.timeout(30)
def test_embeddings_of_token_ids_and_refusals(fake):
    client = _embeddings_client(fake)
    tokens = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4]], encoding_format="float")
    assert [d.embedding for d in tokens.data] == [fake.embedding([1, 2, 3]), fake.embedding([4])]
    assert tokens.usage.total_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        _embeddings_client(fake, key="sk-wrong").embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="text-embedding-3-small", input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-4o-mini-embeddings", input="x")


@pytest.mark.timeout(30)
def test_langchain_openai_embeddings_against_the_fake(fake):
    from langchain_openai import OpenAIEmbeddings

    model = OpenAIEmbeddings(model="text-embedding-3-small", api_key=fake.api_key, base_url=fake.base_url,
                             check_embedding_ctx_length=False, dimensions=16, max_retries=0)
    assert model.embed_documents(["Pikachu", "Squirtle"]) == [fake.embedding("Pikachu", dimensions=16),
                                                               fake.embedding("Squirtle", dimensions=16)]
    assert model.embed_query("Pikachu") == fake.embedding("Pikachu", dimensions=16)
    assert fake.embedding_requests[-1]["dimensions"] == 16
    assert len(fake.requests) == 0  # chat completions are recorded apart
