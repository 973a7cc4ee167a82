"""Whether anything would hear about a call: the test that lets a call nobody listens to skip
LangChain's callback machinery.

LangChain starts a run for every call (``CallbackManager.configure``, then ``on_chain_start``,
a chunk accumulator for ``on_chain_end`` and a signature inspection per call), and a run with no
handler reaches nobody: it is pure cost to the caller. :func:`nobody_listens` answers, for a call's
(ensured) config, whether ``langchain_core.callbacks.manager._configure`` would give the run any
handler at all. It mirrors what that function adds, one source at a time:

* the config's ``callbacks``: a list of handlers, or a callback manager (what a parent run passes
  to its children) with handlers (``astream_events``, ``astream_log``, ``collect_runs`` inside a
  chain, any handler given in ``config["callbacks"]`` or ``with_config(callbacks=...)``);
* ``set_debug(True)`` (a ``ConsoleCallbackHandler``), and ``set_verbose(True)`` (which ``_configure``
  does not read today; counted anyway, so that a user who asked for output never loses it);
* LangSmith tracing: ``tracing_v2_enabled()``, ``LANGSMITH_TRACING``/``LANGCHAIN_TRACING_V2``, a
  LangSmith ``tracing_context`` or ``traceable`` parent (``langchain_core.tracers.context
  ._tracing_v2_is_enabled``), and the retired ``LANGCHAIN_TRACING``/``LANGCHAIN_HANDLER`` (which
  ``_configure`` refuses with an error the long path keeps raising);
* every configure hook registered with ``register_configure_hook`` (``collect_runs``'s
  ``run_collector_var``, and any a library adds): its context variable set, or its environment
  variable set for a hook that makes its own handler.

When any source is there the caller takes LangChain's path unchanged; otherwise the call goes
straight to the backend. The test costs a few microseconds: a few dict and context-variable
reads, and the environment lookups LangChain itself does on every call.
"""

from __future__ import annotations

import os
from typing import Any

from langchain_core.globals import get_debug, get_verbose
from langchain_core.tracers.context import _configure_hooks, _tracing_v2_is_enabled
from langchain_core.utils.env import env_var_is_set

__all__ = ["nobody_listens", "nobody_listens_to_any", "short_path_enabled", "short_paths_taken", "took_short_path"]

# The retired tracer switches: ``_configure`` raises for them (unless v2 is on), so their calls
# take the long path, where that error is raised as before.
_V1_TRACING_ENV = ("LANGCHAIN_TRACING", "LANGCHAIN_HANDLER")
# What ``langchain_core.utils.env.env_var_is_set`` counts as unset (one lookup here, not two).
_UNSET_VALUES = frozenset({"", "0", "false", "False"})


class _Switch:
    """Whether the short path may be taken at all (:func:`short_path_enabled`)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


_switch = _Switch()


def short_path_enabled(enabled: bool) -> None:
    """Allow the short path (the default), or send every call down LangChain's path: for
    comparing the two, or for a handler that hooks into LangChain some way this module does not
    see (then say so: it is a case to add here)."""
    _switch.on = enabled


class _Counter:
    """How many calls took the short path in this process (``short_paths_taken``): a seam for
    tests and for anyone checking that their calls skip the callback machinery."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


_taken = _Counter()


def short_paths_taken() -> int:
    """Calls (or batches, or streams) that went straight to the backend in this process."""
    return _taken.value


def took_short_path() -> None:
    _taken.value += 1


def _callbacks_have_handlers(callbacks: Any) -> bool:
    if not callbacks:
        return False  # None, or an empty list
    if isinstance(callbacks, list):
        return True
    # A callback manager: a parent run's child manager, or one the user built. Its handlers are
    # what _configure copies; inheritable ones are a subset in LangChain's own managers, counted
    # anyway for a hand-built manager.
    return bool(getattr(callbacks, "handlers", True)) or bool(getattr(callbacks, "inheritable_handlers", False))


def nobody_listens(config: Any) -> bool:
    """True when a run of ``config`` (as ``ensure_config`` returns it) would have no handler."""
    return not _callbacks_have_handlers(config.get("callbacks")) and _nothing_global()


def nobody_listens_to_any(configs: Any) -> bool:
    """:func:`nobody_listens` for every config of a batch (the global sources read once)."""
    return not any(_callbacks_have_handlers(c.get("callbacks")) for c in configs) and _nothing_global()


def _nothing_global() -> bool:
    """No handler comes from outside the config: no debug or verbose switch, no configure hook,
    no tracing."""
    if not _switch.on:
        return False
    if get_debug() or get_verbose():
        return False
    for var, _inheritable, handler_class, env_var in _configure_hooks:
        if var.get() is not None or (env_var is not None and handler_class is not None and env_var_is_set(env_var)):
            return False
    if _tracing_v2_is_enabled():
        return False
    get = os.environ.get
    return get(_V1_TRACING_ENV[0], "") in _UNSET_VALUES and get(_V1_TRACING_ENV[1], "") in _UNSET_VALUES
