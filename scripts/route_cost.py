"""What the way out costs one integration: an OpenAIEmbeddings by its constructor, a ChatOpenAI by LangChain's dumpd.

    .venv/bin/python scripts/route_cost.py

Bytes, and the best of 7 runs of 200 encodings (``worker.codec.dumps``) and decodings
(``worker.codec.loads``: on a worker, the class's own constructor, or LangChain's ``load``). No
network: the models point at a closed local port and are never called.
"""

from __future__ import annotations

import os
import timeit


def main() -> None:
    os.environ.setdefault("OPENAI_API_KEY", "sk-worker")  # what a worker reads the key from
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    from worker import codec

    base_url = "http://127.0.0.1:9/v1"
    objects = (("OpenAIEmbeddings (constructor)",
                OpenAIEmbeddings(model="text-embedding-3-small", api_key="sk-client", base_url=base_url)),
               ("ChatOpenAI (LangChain data)", ChatOpenAI(model="gpt-4o-mini", api_key="sk-client", base_url=base_url)))
    for name, obj in objects:
        data = codec.dumps(obj)
        encode = min(timeit.repeat(lambda obj=obj: codec.dumps(obj), number=200, repeat=7)) / 200
        decode = min(timeit.repeat(lambda data=data: codec.loads(data), number=200, repeat=7)) / 200
        print(f"{name:32} {len(data):5} bytes   encode {encode * 1e6:8.0f} us   decode {decode * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
