"""What the four samples share: the Pokémon prompt, the chat model, and where the pool is.

* ``OPENAI_API_KEY`` set: gpt-4o-mini answers (through ``OPENAI_BASE_URL`` if that is set). The
  key is not sent with the task; the workers read it from their own environment.
* ``OPENAI_API_KEY`` not set: a fake chat model gives a canned answer, so the samples still run.
* ``RUNNABLE_K8S_POOL`` set (e.g. ``tcp://127.0.0.1:5555`` or ``k8s://NAMESPACE/RELEASE``): that
  pool is used; otherwise a ``LocalPool(workers=2)`` is started for the run and stopped at the end.
* At the end, this process and the pool's workers are printed (``examples/where.py``): the worker
  that ran the model holds it cached, and its pid is not this process's.

ChatOpenAI needs ``pip install -e ".[openai]"`` (langchain-openai); the fake model needs only
``pip install -e .``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import cloudpickle
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate

from pool import LocalPool
from where import print_workers

# Workers cannot import this file (it is not installed on them): ship its code by value with the
# objects that use it. Your own modules need the same, or to be installed in the worker image.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAKE_ANSWER = "Pikachu is an Electric-type Pokémon, famous as Ash's partner."

prompt = ChatPromptTemplate.from_messages([
    ("system", "You are a Pokémon expert. Answer the user's question."),
    ("human", "Question: {input}"),
])


class _SameAnswer:
    """An endless iterator of one answer, for GenericFakeChatModel (the workers keep the model
    warm and reuse it, so a list iterator would run dry)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __iter__(self) -> _SameAnswer:
        return self

    def __next__(self) -> str:
        return self.text


def chat_model() -> BaseChatModel:
    if os.environ.get("OPENAI_API_KEY"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini", base_url=os.environ.get("OPENAI_BASE_URL"))
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    print("OPENAI_API_KEY is not set: a fake chat model answers instead of gpt-4o-mini.")
    return GenericFakeChatModel(messages=_SameAnswer(FAKE_ANSWER))


@contextlib.contextmanager
def pool_address() -> Iterator[str]:
    """RUNNABLE_K8S_POOL if set, else a local pool for the duration of the block. When the block
    ends well, this process and the pool's workers are printed (the model is cached on the
    worker that ran it)."""
    if os.environ.get("RUNNABLE_K8S_POOL"):
        yield os.environ["RUNNABLE_K8S_POOL"]
        print_workers(None)
        return
    with LocalPool(workers=2) as local:
        yield local.address
        print_workers(local)
