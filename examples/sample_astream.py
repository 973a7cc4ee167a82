"""Stream the answer to a Pokémon question with asyncio (``astream``) from the worker pool.

A port of the original kaitoy/runnable-k8s sample of the same name: the chain is
``prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini")) | StrOutputParser()`` and
``chain.astream`` prints each chunk, followed by ``/``, as soon as the worker yields it.

Run it from a checkout, after ``pip install -e ".[openai]"`` (the ``openai`` extra brings
langchain-openai for ChatOpenAI; without ``OPENAI_API_KEY`` a fake model answers and
``pip install -e .`` is enough)::

    python examples/sample_astream.py "What type is Pikachu?"

The model and the pool are chosen as ``examples/pokemon.py`` explains (works with no API key).
"""

import asyncio
import sys

from langchain_core.output_parsers import StrOutputParser

from pokemon import chat_model, pool_address, prompt
from pool import RunnableK8s


async def main(address):
    chain = prompt | RunnableK8s(bound=chat_model(), pool=address) | StrOutputParser()

    question = sys.argv[1] if len(sys.argv) > 1 else "What type is Pikachu?"
    async for output in chain.astream({"input": question}):
        print(f"{output}/", end="", flush=True)
    print()


if __name__ == "__main__":
    with pool_address() as address:
        asyncio.run(main(address))
