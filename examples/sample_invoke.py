"""Ask one Pokémon question through a chain whose chat model runs on the worker pool.

A port of the original kaitoy/runnable-k8s sample of the same name: the chain is
``prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini")) | StrOutputParser()`` and only the
model step runs remotely; ``chain.invoke`` prints the answer.

Run it (from a checkout, after ``pip install -e ".[openai]"``)::

    python examples/sample_invoke.py "What type is Pikachu?"

* ``OPENAI_API_KEY`` set: gpt-4o-mini answers (through ``OPENAI_BASE_URL`` if that is set). The
  key is not sent with the task; the workers read it from their own environment.
* ``OPENAI_API_KEY`` not set: a fake chat model gives a canned answer, so the sample still runs.
* ``RUNNABLE_K8S_POOL`` set (e.g. ``tcp://127.0.0.1:5555``): that pool is used; otherwise a
  ``LocalPool(workers=2)`` is started for the run and stopped at the end.
"""

import os
import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from pool import LocalPool, RunnableK8s

FAKE_ANSWER = "Pikachu is an Electric-type Pokémon, famous as Ash's partner."


class _SameAnswer:
    """An endless iterator of one answer, for GenericFakeChatModel (the workers keep the model
    warm and reuse it, so a list iterator would run dry)."""

    def __init__(self, text):
        self.text = text

    def __iter__(self):
        return self

    def __next__(self):
        return self.text


def chat_model():
    if os.environ.get("OPENAI_API_KEY"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini", base_url=os.environ.get("OPENAI_BASE_URL"))
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    print("OPENAI_API_KEY is not set: a fake chat model answers instead of gpt-4o-mini.")
    return GenericFakeChatModel(messages=_SameAnswer(FAKE_ANSWER))


prompt = ChatPromptTemplate.from_messages([
    (
        "system",
        "You are a Pokémon expert. Answer the user's question.",
    ),
    (
        "human",
        "Question: {input}",
    ),
])


def main(pool_address):
    llm = chat_model()

    chain = prompt | RunnableK8s(bound=llm, pool=pool_address) | StrOutputParser()

    question = sys.argv[1] if len(sys.argv) > 1 else "What type is Pikachu?"
    print(chain.invoke({"input": question}))


if __name__ == "__main__":
    if os.environ.get("RUNNABLE_K8S_POOL"):
        main(os.environ["RUNNABLE_K8S_POOL"])
    else:
        with LocalPool(workers=2) as p:
            main(p.address)
