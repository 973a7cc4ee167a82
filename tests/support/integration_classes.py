"""Small pydantic integrations built like real ones, for tests/test_constructor_route.py.

Each is importable on a test pool's workers (they run from the repository's root), so the way
out can name it by module path, as it names ``langchain_openai.OpenAIEmbeddings``:

* ``KeyedEmbeddings``: an ``Embeddings`` whose key is a ``SecretStr`` read from
  ``RK8S_TEST_EMBEDDINGS_KEY`` by LangChain's ``secret_from_env`` default, whose fields have aliases
  it does not populate by name, and whose vectors depend on its key (so a test sees which key the
  worker used);
* ``LockedSplitter``: a plain pydantic model (not an integration, no secret) whose validator builds
  an excluded ``lock``, so it does not pickle by value: the constructor route rescues it;
* ``HoldsClient``: a model with a client field that is not excluded: refused, naming the field.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, ClassVar

from langchain_core.embeddings import Embeddings
from langchain_core.load.serializable import Serializable
from langchain_core.utils.utils import secret_from_env
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

KEY_ENV = "RK8S_TEST_EMBEDDINGS_KEY"


class KeyedEmbeddings(BaseModel, Embeddings):
    """Vectors of ``size`` numbers from the text and the key (see the module's docstring)."""

    model_config = ConfigDict(populate_by_name=False)

    size: int = Field(default=4, alias="dimensions")
    api_key: SecretStr | None = Field(default_factory=secret_from_env(KEY_ENV, default=None), alias="key")
    client: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _build_client(self) -> KeyedEmbeddings:
        if self.client is None:
            self.client = threading.Lock()  # built state, as an HTTP client would be
        return self

    def _vector(self, text: str) -> list[float]:
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        digest = hashlib.sha256(f"{key}\0{text}".encode()).digest()
        return [byte / 255 for byte in digest[: self.size]]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


class LockedSplitter(BaseModel):
    """Splits a text on ``separator``; holds a lock it built itself."""

    separator: str = " "
    lock: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _build_lock(self) -> LockedSplitter:
        if self.lock is None:
            self.lock = threading.Lock()
        return self

    def split(self, text: str) -> list[str]:
        with self.lock:
            return text.split(self.separator)


class HoldsClient(BaseModel):
    """A model whose client field is not marked ``exclude=True``: a user-set client cannot travel."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "x"
    http_client: Any = None

    def describe(self, _: Any) -> str:
        return self.name


class Notes(BaseModel):
    """A plain model that pickles: it keeps travelling by value, in-place changes included."""

    items: list[str] = Field(default_factory=list)


TOKEN_ENV = "RK8S_TEST_SERVICE_TOKEN"


class ServiceSettings(BaseModel):
    """Plain settings holding a token: it pickles, and by value the token would be in the bytes."""

    url: str
    token: SecretStr = Field(default_factory=secret_from_env(TOKEN_ENV))


class DeclaredSecretTool(Serializable):
    """A LangChain object that declares its secret in ``lc_secrets`` (as community integrations do)
    but is not LangChain-serializable: its key has no default, only the declared variable."""

    api_key: SecretStr
    endpoint: str = "https://tools.example"

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": TOKEN_ENV}

    def call(self, _: Any) -> str:
        return f"{self.endpoint} {self.api_key.get_secret_value()}"


class CountedEmbeddings(BaseModel, Embeddings):
    """Counts its constructions in this process: its vectors say how many there have been."""

    built: ClassVar[int] = 0
    size: int = 2

    @model_validator(mode="after")
    def _count(self) -> CountedEmbeddings:
        type(self).built += 1
        return self

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return [float(type(self).built)] * self.size
