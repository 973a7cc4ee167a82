"""Integrations cross the wire by their constructor (worker/constructor_route.py): an
``OpenAIEmbeddings`` holds an HTTP client, so cloudpickle alone cannot carry it; it travels as its
class path and the arguments the user set, its key left out and read from the worker's environment.

Real objects, the fake OpenAI server (tests/support/fake_openai.py), a real LocalPool whose workers
(only) hold the key the server accepts: the clients here build their models with a key the server
refuses, so a remote call that works proves the worker used its own key.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.embeddings import DeterministicFakeEmbedding, FakeEmbeddings
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import AzureOpenAIEmbeddings, ChatOpenAI, OpenAIEmbeddings
from langchain_text_splitters import CharacterTextSplitter, RecursiveCharacterTextSplitter

from pool import RunnableK8s
from pool.embeddings import EmbeddingsRunnable
from pool.errors import SerializationError
from tests.support.fake_openai import FAKE_KEY, FakeOpenAI
from tests.support.integration_classes import (
    KEY_ENV,
    TOKEN_ENV,
    CountedEmbeddings,
    DeclaredSecretTool,
    HoldsClient,
    KeyedEmbeddings,
    LockedSplitter,
    Notes,
    ServiceSettings,
)
from worker import codec

pytestmark = pytest.mark.timeout(120)

CLIENT_KEY = "sk-client-key-the-server-refuses"
TEXTS = ["Pikachu is an Electric-type Pokémon.", "Squirtle is a Water-type Pokémon.", "Charmander likes fire."]


def embeddings(fake: FakeOpenAI, key: str = CLIENT_KEY, **kwargs: Any) -> OpenAIEmbeddings:
    # check_embedding_ctx_length=False: the default tokenizes with tiktoken, which downloads its
    # encoding (no network here); the texts are sent as they are.
    return OpenAIEmbeddings(model="text-embedding-3-small", base_url=fake.base_url, api_key=key,
                            check_embedding_ctx_length=False, max_retries=0, **kwargs)


def route(data: bytes) -> str:
    """Which way the pickle rebuilds LangChain and pydantic objects: what the table reports."""
    routes = [name for name, marker in (("constructor", b"rebuild_by_constructor"),
                                        ("langchain", b"_rebuild_langchain_object")) if marker in data]
    return "+".join(routes) or "pickle"


def loads_in(env: dict[str, str], data: bytes, program: str) -> subprocess.CompletedProcess[str]:
    """``program`` in a fresh interpreter (no client state, its own environment) with the decoded
    object as ``obj``."""
    code = f"import sys; from worker import codec; obj = codec.loads(sys.stdin.buffer.read()); {program}"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OPENAI_API_KEY", KEY_ENV, TOKEN_ENV, "AZURE_OPENAI_API_KEY")}
    return subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, env={**clean, **env},
                          timeout=60, check=False, text=False)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------- on the wire


def test_the_bytes_name_the_class_and_the_key_variable_but_not_the_key(fake_openai):
    emb = embeddings(fake_openai)
    data = codec.dumps(RunnableLambda(emb.embed_documents))
    assert route(data) == "constructor"
    assert CLIENT_KEY.encode() not in data
    assert b"OPENAI_API_KEY" in data and b"langchain_openai" in data
    # The same holds for an integration inside data (an input), which the C pickler would copy.
    assert CLIENT_KEY.encode() not in codec.dumps_input({"model": emb}, {})


def test_the_digest_is_the_same_for_the_same_settings_and_differs_with_them(fake_openai):
    one = codec.dumps(RunnableLambda(embeddings(fake_openai).embed_documents))
    assert codec.digest(one) == codec.digest(codec.dumps(RunnableLambda(embeddings(fake_openai).embed_documents)))
    other = codec.dumps(RunnableLambda(embeddings(fake_openai, dimensions=8).embed_documents))
    assert codec.digest(one) != codec.digest(other)


def test_the_digest_is_the_same_in_another_client_process(fake_openai):
    """Workers cache by digest: two clients sending the same integration must name it alike."""
    build = ("from langchain_core.runnables import RunnableLambda; from langchain_openai import OpenAIEmbeddings; "
             "from worker import codec; emb = OpenAIEmbeddings(model='text-embedding-3-small', base_url={url!r}, "
             "api_key={key!r}, check_embedding_ctx_length=False, max_retries=0); "
             "print(codec.digest(codec.dumps(RunnableLambda(emb.embed_documents))))")
    program = build.format(url=fake_openai.base_url, key=CLIENT_KEY)
    other = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=True)
    here = codec.digest(codec.dumps(RunnableLambda(embeddings(fake_openai).embed_documents)))
    assert other.stdout.decode().strip() == here


def test_an_object_held_twice_is_rebuilt_once_and_shared(fake_openai, monkeypatch):
    emb = embeddings(fake_openai)
    store = InMemoryVectorStore(embedding=emb)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    rebuilt_store, rebuilt_method = codec.loads(codec.dumps((store, RunnableLambda(emb.embed_query))))
    assert rebuilt_store.embedding is rebuilt_method.func.__self__
    assert rebuilt_store.embedding.openai_api_key.get_secret_value() == FAKE_KEY


def test_a_missing_key_on_the_worker_is_named():
    data = codec.dumps(OpenAIEmbeddings(model="text-embedding-3-small", api_key=CLIENT_KEY))
    result = loads_in({}, data, "print(obj)")
    assert result.returncode != 0
    assert b"OPENAI_API_KEY, which is not set" in result.stderr


def test_a_worker_without_the_integrations_package_is_told_which_to_install(fake_openai):
    data = codec.dumps(RunnableLambda(embeddings(fake_openai).embed_documents))
    # sys.modules[name] = None: this interpreter cannot import langchain_openai, as a worker image without it.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['langchain_openai'] = None; from worker import codec; "
         "codec.loads(sys.stdin.buffer.read())"], input=data, capture_output=True, timeout=60, check=False)
    version = importlib.metadata.version("langchain-openai")
    assert result.returncode != 0
    assert f"Install `pip install langchain-openai=={version}` in the worker image".encode() in result.stderr


def test_a_secret_by_alias_comes_from_the_workers_environment():
    """A class of its own (not populated by name: aliases are what its constructor takes) whose
    key's default is LangChain's ``secret_from_env``: the worker reads that variable."""
    model = KeyedEmbeddings(key="the-clients-secret", dimensions=6)
    data = codec.dumps(RunnableLambda(model.embed_query))
    assert b"the-clients-secret" not in data and KEY_ENV.encode() in data
    result = loads_in({KEY_ENV: "the-workers-secret"}, data, "print(obj.invoke('Pikachu'))")
    assert result.returncode == 0, result.stderr
    expected = KeyedEmbeddings(key="the-workers-secret", dimensions=6).embed_query("Pikachu")
    assert result.stdout.decode().strip() == str(expected)


def test_settings_holding_a_secret_never_travel_by_value():
    """A model that pickles fine but holds a ``SecretStr`` (here read from the client's environment by
    its default) used to travel by value, its token in the clear; it now crosses by its constructor."""
    settings = ServiceSettings(url="https://pokeapi.example", token="the-clients-token")
    data = codec.dumps(RunnableLambda(lambda _: (settings.url, settings.token.get_secret_value())))
    assert b"the-clients-token" not in data and TOKEN_ENV.encode() in data
    result = loads_in({TOKEN_ENV: "the-workers-token"}, data, "print(obj.invoke(None))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == str(("https://pokeapi.example", "the-workers-token"))


def test_a_secret_declared_in_lc_secrets_is_read_from_the_variable_it_names():
    """Such an object used to be refused (a secret, and no dumpd route); it now crosses."""
    tool = DeclaredSecretTool(api_key="the-clients-token", endpoint="https://pokeapi.example")
    data = codec.dumps(RunnableLambda(tool.call))
    assert b"the-clients-token" not in data and route(data) == "constructor"
    result = loads_in({TOKEN_ENV: "the-workers-token"}, data, "print(obj.invoke(None))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "https://pokeapi.example the-workers-token"
    missing = loads_in({}, data, "print(obj.invoke(None))")
    assert f"DeclaredSecretTool.api_key is a secret, so the client did not send it: this worker reads it from " \
           f"{TOKEN_ENV}, which is not set".encode() in missing.stderr


def test_a_client_the_user_set_is_refused_naming_the_field(fake_openai):
    with httpx.Client() as client, pytest.raises(
            codec.CodecError, match=r"OpenAIEmbeddings\.http_client holds a httpx\.Client"):
        codec.dumps(RunnableLambda(embeddings(fake_openai, http_client=client).embed_documents))
    with pytest.raises(codec.CodecError, match=r"HoldsClient\.http_client holds a _thread\.lock"):
        codec.dumps(RunnableLambda(HoldsClient(http_client=threading.Lock()).describe))


def test_a_key_given_as_a_function_is_refused_naming_the_variable_to_set(fake_openai):
    with pytest.raises(codec.CodecError, match=r"openai_api_key is a function that returns a secret.*OPENAI_API_KEY"):
        codec.dumps(OpenAIEmbeddings(model="text-embedding-3-small", base_url=fake_openai.base_url,
                                     api_key=lambda: CLIENT_KEY))


def test_a_model_that_does_not_pickle_is_rebuilt_by_its_constructor():
    splitter = LockedSplitter(separator=",")
    data = codec.dumps(RunnableLambda(splitter.split))
    assert route(data) == "constructor"
    assert codec.loads(data).invoke("a,b,c") == ["a", "b", "c"]


def test_a_model_that_pickles_keeps_travelling_by_value():
    """A constructor would lose what changed after construction (an appended item): a plain model
    that pickles is not rebuilt by its constructor."""
    notes = Notes()
    notes.items.append("Pikachu")  # not in model_fields_set
    data = codec.dumps(RunnableLambda(lambda _: list(notes.items)))
    assert route(data) == "pickle"
    assert codec.loads(data).invoke(None) == ["Pikachu"]


# ---------------------------------------------------------------------------- through a real pool


def test_openai_embeddings_as_bound_give_the_local_vectors_with_the_workers_key(fake_openai, local_pool):
    with pytest.raises(openai.AuthenticationError):
        embeddings(fake_openai).embed_documents(TEXTS[:1])  # the client's key is refused here
    expected = embeddings(fake_openai, key=FAKE_KEY).embed_documents(TEXTS)
    remote = RunnableK8s(bound=EmbeddingsRunnable(embeddings=embeddings(fake_openai), mode="documents"),
                         pool=local_pool.address)
    assert remote.batch(TEXTS) == expected
    assert remote.invoke(TEXTS[0]) == expected[0]
    assert expected[0] == fake_openai.embedding(TEXTS[0])


async def test_openai_embeddings_inside_a_runnable_lambda(fake_openai, local_pool):
    emb = embeddings(fake_openai, dimensions=8)
    remote = RunnableK8s(bound=RunnableLambda(emb.embed_documents, afunc=emb.aembed_documents),
                         pool=local_pool.address)
    expected = [fake_openai.embedding(text, dimensions=8) for text in TEXTS]
    assert remote.invoke(TEXTS) == expected
    assert await remote.ainvoke(TEXTS) == expected
    assert fake_openai.embedding_requests[-1]["dimensions"] == 8


def test_an_in_memory_vector_store_retriever_finds_the_same_documents(fake_openai, local_pool):
    store = InMemoryVectorStore.from_texts(TEXTS, embeddings(fake_openai, key=FAKE_KEY),
                                           metadatas=[{"n": i} for i in range(len(TEXTS))])
    retriever = store.as_retriever(search_kwargs={"k": 2})
    assert FAKE_KEY.encode() not in codec.dumps(retriever)
    local = retriever.invoke("Which Pokémon is Electric?")
    remote = RunnableK8s(bound=retriever, pool=local_pool.address).invoke("Which Pokémon is Electric?")
    assert [(d.page_content, d.metadata, d.id) for d in remote] == [(d.page_content, d.metadata, d.id) for d in local]
    assert len(local) == 2


def test_a_worker_builds_the_integration_once_per_runnable_not_per_call(local_pool):
    """Each vector says how many CountedEmbeddings its worker process has built: 1 on every call."""
    remote = RunnableK8s(bound=RunnableLambda(CountedEmbeddings(size=3).embed_query), pool=local_pool.address)
    assert remote.batch([f"text {i}" for i in range(12)]) == [[1.0] * 3] * 12
    assert remote.invoke("again") == [1.0] * 3


@pytest.fixture
def vendor_module(tmp_path: Path) -> Iterator[Any]:
    """An integration in a module this process can import and the pool's workers cannot."""
    (tmp_path / "rk8s_vendor_embeddings.py").write_text(
        "from langchain_core.embeddings import Embeddings\n"
        "from pydantic import BaseModel\n\n"
        "class VendorEmbeddings(BaseModel, Embeddings):\n"
        "    size: int = 3\n"
        "    def embed_documents(self, texts):\n"
        "        return [[1.0] * self.size for _ in texts]\n"
        "    def embed_query(self, text):\n"
        "        return [1.0] * self.size\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("rk8s_vendor_embeddings")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rk8s_vendor_embeddings", None)


def test_a_class_the_worker_cannot_import_names_its_module(vendor_module, local_pool):
    model = vendor_module.VendorEmbeddings(size=2)
    remote = RunnableK8s(bound=RunnableLambda(model.embed_documents), pool=local_pool.address)
    with pytest.raises(SerializationError, match=r"VendorEmbeddings cannot be rebuilt on this worker: its module "
                                                 r"rk8s_vendor_embeddings cannot be imported here") as caught:
        remote.invoke(["a"])
    assert "worker image" in str(caught.value)


def test_a_refused_field_is_a_serialization_error_before_anything_is_sent(fake_openai, local_pool):
    with httpx.Client() as client:
        remote = RunnableK8s(bound=RunnableLambda(embeddings(fake_openai, http_client=client).embed_documents),
                             pool=local_pool.address)
        with pytest.raises(SerializationError, match="http_client"):
            remote.invoke(["a"])


# ---------------------------------------------------------------------------- the table


def _vector_store(fake: FakeOpenAI) -> Any:
    return InMemoryVectorStore.from_texts(TEXTS, embeddings(fake, key=FAKE_KEY))


# name, how to build the runnable, the route it takes, an input (None: only rebuilt, not run: it
# would need a server or state that the comparison cannot share).
TABLE: list[tuple[str, Callable[[FakeOpenAI], Any], str, Any]] = [
    ("OpenAIEmbeddings", lambda f: RunnableLambda(embeddings(f).embed_documents), "constructor", TEXTS),
    ("OpenAIEmbeddings in EmbeddingsRunnable", lambda f: EmbeddingsRunnable(embeddings=embeddings(f)),
     "constructor", TEXTS[0]),
    ("AzureOpenAIEmbeddings", lambda f: RunnableLambda(AzureOpenAIEmbeddings(
        azure_endpoint="https://example.openai.azure.com", api_key=CLIENT_KEY, api_version="2024-02-01",
        model="text-embedding-3-small").embed_documents), "constructor", None),
    ("ChatOpenAI", lambda f: ChatOpenAI(model="gpt-4o-mini", base_url=f.base_url, api_key=CLIENT_KEY),
     "langchain", None),
    ("FakeEmbeddings", lambda f: RunnableLambda(FakeEmbeddings(size=4).embed_documents), "constructor", None),
    ("DeterministicFakeEmbedding", lambda f: RunnableLambda(DeterministicFakeEmbedding(size=4).embed_documents),
     "constructor", TEXTS),
    ("FakeListChatModel", lambda f: FakeListChatModel(responses=["Pikachu"]), "pickle", "hi"),
    ("GenericFakeChatModel", lambda f: GenericFakeChatModel(messages=iter([AIMessage("Pikachu")])),
     "langchain", "hi"),
    ("InMemoryVectorStore", lambda f: RunnableLambda(_vector_store(f).similarity_search), "constructor", "Electric"),
    ("InMemoryVectorStore retriever", lambda f: _vector_store(f).as_retriever(), "constructor", "Electric"),
    ("InMemoryCache", lambda f: RunnableLambda(lambda key: InMemoryCache().lookup(key, "llm")), "pickle", "x"),
    ("RecursiveCharacterTextSplitter", lambda f: RunnableLambda(
        RecursiveCharacterTextSplitter(chunk_size=20, chunk_overlap=0).split_text), "pickle", " ".join(TEXTS)),
    ("CharacterTextSplitter", lambda f: RunnableLambda(
        CharacterTextSplitter(separator=" ", chunk_size=20, chunk_overlap=0).split_text), "pickle", " ".join(TEXTS)),
]


@pytest.mark.parametrize(("name", "build", "expected_route", "value"), TABLE, ids=[row[0] for row in TABLE])
def test_integration_table(name, build, expected_route, value, fake_openai, monkeypatch):
    """Each integration crosses, by the route the table in docs/langchain.md#integrations says,
    with no key in the bytes, and does on the other side what it does here."""
    runnable = build(fake_openai)
    data = codec.dumps(runnable)
    assert route(data) == expected_route
    assert CLIENT_KEY.encode() not in data and FAKE_KEY.encode() not in data
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", FAKE_KEY)
    rebuilt = codec.loads(data)
    assert type(rebuilt) is type(runnable)
    if value is None:
        return
    if name.startswith("OpenAIEmbeddings"):  # the client's key is refused: what the server gives the worker's
        vectors = [fake_openai.embedding(text) for text in (value if isinstance(value, list) else [value])]
        local = vectors if isinstance(value, list) else vectors[0]
    else:
        local = runnable.invoke(value)  # the original: a store's documents got random ids when added
    assert _comparable(rebuilt.invoke(value)) == _comparable(local)


def _comparable(value: Any) -> Any:
    """A message's content (its id is the run's): what must be the same on both sides."""
    return value.content if isinstance(value, AIMessage) else value


# ---------------------------------------------------------------------------- what a client may name


@pytest.mark.parametrize(("ref", "kwargs", "secrets", "message"), [
    (("os", "system", ""), {}, (), "is not a pydantic model here: refused"),
    (("subprocess", "Popen", ""), {"args": ["true"]}, (), "is not a pydantic model here: refused"),
    (("os;x", "y", ""), {}, (), "is not a class name: refused"),
    (("pydantic", "BaseModel.__subclasses__", ""), {}, (), "does not exist on this worker"),
    (("a", "b"), {}, (), "malformed class reference"),
    (("tests.support.integration_classes", "Notes", ""), {1: "x"}, (), "malformed constructor arguments"),
    (("tests.support.integration_classes", "Notes", ""), {}, (("items", ("A",) * 9),), "malformed secret"),
    (("tests.support.integration_classes", "Nowhere", ""), {}, (), "does not exist on this worker"),
])
def test_the_worker_rebuilds_only_pydantic_models_from_well_formed_references(ref, kwargs, secrets, message):
    """What the constructor route lets a client name; the pickle around it can already do more
    (docs/design.md#trust-one-pool-is-one-trust-domain), so these keep a malformed reference to a
    clear error rather than draw a boundary."""
    from worker.constructor_route import rebuild_by_constructor

    with pytest.raises(codec.CodecError, match=message):
        rebuild_by_constructor(ref, kwargs, secrets)
