"""Serialization for both directions, in one import: the names callers use, re-exported.

Each direction has its own modules, so that each can be read alone:

* the way out, client to worker (runnables and inputs): ``worker.outbound`` (``dumps``,
  ``loads``, ``dumps_input``, ``dumps_batch_input``, ``digest``), with ``worker.langchain_route``
  (LangChain objects as data, secrets as references), ``worker.constructor_route`` (pydantic
  integrations as their class and the arguments set, rebuilt by their constructor on the worker,
  secrets from its environment), ``worker.sentinels`` (module-level
  sentinels by reference) and ``worker.unsendable`` (errors that say what to change);
* the way back, worker to client (outputs, chunks, exceptions, callback events): data, never a
  pickle, in the package ``worker.result_codec``, the security boundary;
* which of the two formats the way back takes for a call (``trusted``): ``worker.return_path``.

See docs/design.md#serialization for why the two directions differ.
"""

from __future__ import annotations

from worker.langchain_route import ALLOWED_OBJECTS_ENV as ALLOWED_OBJECTS_ENV
from worker.langchain_route import DEFAULT_ALLOWED_OBJECTS as DEFAULT_ALLOWED_OBJECTS
from worker.langchain_route import rebuild_langchain_object as _rebuild_langchain_object
from worker.outbound import digest as digest
from worker.outbound import dumps as dumps
from worker.outbound import dumps_batch_input as dumps_batch_input
from worker.outbound import dumps_input as dumps_input
from worker.outbound import loads as loads
from worker.result_codec import REFUSAL_ADVICE as REFUSAL_ADVICE
from worker.result_codec import CodecError as CodecError
from worker.result_codec import Refused as Refused
from worker.result_codec import RemoteExceptionInfo as RemoteExceptionInfo
from worker.result_codec import Unresolvable as Unresolvable
from worker.result_codec import dumps_result as dumps_result
from worker.result_codec import loads_result as loads_result
from worker.return_path import dump_exception as dump_exception
from worker.return_path import dumps_output as dumps_output
from worker.return_path import load_exception as load_exception
from worker.return_path import loads_output as loads_output
from worker.sentinels import rebuild_sentinel as _sentinel

# The receiving side of a pickle finds these two by the names they travel as
# (``worker.codec._sentinel``, ``worker.codec._rebuild_langchain_object``): keep them here.
__all__ = [
    "ALLOWED_OBJECTS_ENV", "DEFAULT_ALLOWED_OBJECTS", "REFUSAL_ADVICE", "CodecError", "Refused",
    "RemoteExceptionInfo", "Unresolvable", "_rebuild_langchain_object", "_sentinel", "digest", "dump_exception",
    "dumps", "dumps_batch_input", "dumps_input", "dumps_output", "dumps_result", "load_exception", "loads",
    "loads_output", "loads_result",
]
