"""``EmbeddingsRunnable``: an embeddings model as a Runnable whose batch is ONE request.

Defined in ``worker.embeddings`` (a worker unpickles it by that name, and a worker imports nothing
of ``pool``); this is its public name for callers::

    from pool.embeddings import EmbeddingsRunnable
"""

from __future__ import annotations

from worker.embeddings import EmbeddingsRunnable as EmbeddingsRunnable

__all__ = ["EmbeddingsRunnable"]
