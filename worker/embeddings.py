"""``EmbeddingsRunnable``: a LangChain ``Embeddings`` model as a Runnable that batches natively.

Embeddings models are not Runnables, so they cannot be a ``RunnableK8s``'s ``bound`` as they are.
This adapter makes one: ``invoke(text)`` is ``embed_query(text)``, and a batch of texts is ONE
``embed_documents(texts)`` (one API request for the whole batch, which is what an embeddings
provider charges and rate-limits by), including the ``batch_as_completed`` a worker runs a batch
task with. Put behind ``RunnableK8s(..., batch_window_ms=5)``, concurrent callers each embedding
one text make one request per gathered batch:

    from pool.embeddings import EmbeddingsRunnable

    embed = RunnableK8s(bound=EmbeddingsRunnable(embeddings=OpenAIEmbeddings()), pool=..., batch_window_ms=5)
    vector = embed.invoke("a text")  # from many threads or coroutines at once

A batch's texts are embedded together, so one failing request fails every text of it: each is
given that exception (with ``return_exceptions``), as callers of one request would all see it.
``embed_query`` and ``embed_documents`` may differ for some models (an instruction prefix for
queries); a batch uses ``embed_documents``, so use ``mode="documents"`` for single texts too when
they must match what a batch gives.

It lives in ``worker`` because workers unpickle it by its module name and import nothing of
``pool``; callers import it as ``pool.embeddings.EmbeddingsRunnable``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.embeddings import Embeddings
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict

__all__ = ["EmbeddingsRunnable"]


class EmbeddingsRunnable(RunnableSerializable[str, list[float]]):
    """``embeddings`` as a Runnable from a text to its vector; a batch is one ``embed_documents``.

    Args:
        embeddings: any LangChain ``Embeddings`` (``OpenAIEmbeddings``, ``DeterministicFakeEmbedding``...).
        mode: ``"query"`` (default): a single text goes through ``embed_query``; ``"documents"``: through
            ``embed_documents([text])``, so that it is embedded exactly as in a batch.
    """

    embeddings: Embeddings
    mode: Literal["query", "documents"] = "query"

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def invoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[float]:
        if self.mode == "documents":
            return _vector(self.embeddings.embed_documents([_text(input)])[0])
        return _vector(self.embeddings.embed_query(_text(input)))

    async def ainvoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[float]:
        if self.mode == "documents":
            return _vector((await self.embeddings.aembed_documents([_text(input)]))[0])
        return _vector(await self.embeddings.aembed_query(_text(input)))

    def batch(self, inputs: list[str], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return self._all(inputs, return_exceptions)

    async def abatch(self, inputs: list[str], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return await self._aall(inputs, return_exceptions)

    def batch_as_completed(self, inputs: Sequence[str],
                           config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                           return_exceptions: bool = False, **kwargs: Any) -> Iterator[tuple[int, Any]]:
        """Every text at once (they are one request): how a worker runs a batch task."""
        yield from enumerate(self._all(inputs, return_exceptions))

    async def abatch_as_completed(self, inputs: Sequence[str],
                                  config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                                  return_exceptions: bool = False, **kwargs: Any) -> AsyncIterator[tuple[int, Any]]:
        for index, outcome in enumerate(await self._aall(inputs, return_exceptions)):
            yield index, outcome

    def _all(self, inputs: Sequence[str], return_exceptions: bool) -> list[Any]:
        if not inputs:
            return []
        try:
            return [_vector(v) for v in self.embeddings.embed_documents([_text(text) for text in inputs])]
        except Exception as exc:
            if return_exceptions:
                return [exc] * len(inputs)
            raise

    async def _aall(self, inputs: Sequence[str], return_exceptions: bool) -> list[Any]:
        if not inputs:
            return []
        try:
            return [_vector(v) for v in await self.embeddings.aembed_documents([_text(text) for text in inputs])]
        except Exception as exc:
            if return_exceptions:
                return [exc] * len(inputs)
            raise


def _text(value: Any) -> str:
    """The text to embed; anything else is refused by name (an embeddings API would refuse it less clearly)."""
    if not isinstance(value, str):
        raise TypeError(f"EmbeddingsRunnable embeds text: got {type(value).__name__}; pass a str")
    return value


def _vector(values: Sequence[float]) -> list[float]:
    """Plain floats: some models give NumPy scalars, which would not travel back as data only."""
    return [float(x) for x in values]
