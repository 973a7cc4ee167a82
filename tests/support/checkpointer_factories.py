"""Checkpointer factories a test worker is given by import path (``--checkpointer
tests.support.checkpointer_factories:NAME``): good and bad ones, to see what the worker does."""

from __future__ import annotations

import sqlite3
from typing import Any


def in_memory() -> Any:
    """A saver every graph of one worker shares (not across workers: for checks of one worker)."""
    from langgraph.checkpoint.memory import InMemorySaver

    return InMemorySaver()


def sync_sqlite() -> Any:
    """LangGraph's SqliteSaver, which has no async methods: the worker must refuse it at start."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    return SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))


def not_a_checkpointer() -> Any:
    return {"checkpointer": "no"}


def broken() -> Any:
    raise ConnectionRefusedError("the checkpoint store refused the connection")
