"""Ask one Pokémon question through a chain whose chat model runs on the worker pool.

A port of the original kaitoy/runnable-k8s sample of the same name: the chain is
``prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini")) | StrOutputParser()`` and only the
model step runs remotely; ``chain.invoke`` prints the answer.

Run it from a checkout, after ``pip install -e ".[openai]"`` (the ``openai`` extra brings
langchain-openai for ChatOpenAI; without ``OPENAI_API_KEY`` a fake model answers and
``pip install -e .`` is enough)::

    python examples/sample_invoke.py "What type is Pikachu?"

The model and the pool are chosen as ``examples/pokemon.py`` explains (works with no API key).
"""

import sys

from langchain_core.output_parsers import StrOutputParser

from pokemon import chat_model, pool_address, prompt
from pool import RunnableK8s


def main(address):
    chain = prompt | RunnableK8s(bound=chat_model(), pool=address) | StrOutputParser()

    question = sys.argv[1] if len(sys.argv) > 1 else "What type is Pikachu?"
    print(chain.invoke({"input": question}))


if __name__ == "__main__":
    with pool_address() as address:
        main(address)
