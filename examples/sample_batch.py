"""Ask three Pokémon questions in one batch; the pool runs them in parallel on its workers.

A port of the original kaitoy/runnable-k8s sample of the same name: the chain is
``prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini")) | StrOutputParser()`` and
``chain.batch`` sends the three inputs to the pool at once; the answers are printed in order.

Run it from a checkout, after ``pip install -e ".[openai]"`` (the ``openai`` extra brings
langchain-openai for ChatOpenAI; without ``OPENAI_API_KEY`` a fake model answers and
``pip install -e .`` is enough)::

    python examples/sample_batch.py "What type is Pikachu?" "What does Eevee evolve into?" "Who is Mewtwo?"

The model and the pool are chosen as ``examples/pokemon.py`` explains (works with no API key).
"""

import sys

from langchain_core.output_parsers import StrOutputParser

from pokemon import chat_model, pool_address, prompt
from pool import RunnableK8s

DEFAULT_QUESTIONS = [
    "What type is Pikachu?",
    "What does Eevee evolve into?",
    "Which Pokémon is number 150 in the Pokédex?",
]


def main(address):
    chain = prompt | RunnableK8s(bound=chat_model(), pool=address) | StrOutputParser()

    questions = sys.argv[1:4] + DEFAULT_QUESTIONS[len(sys.argv[1:4]):]
    outputs = chain.batch([{"input": q} for q in questions])

    for o in outputs:
        print(o + "\n")


if __name__ == "__main__":
    with pool_address() as address:
        main(address)
