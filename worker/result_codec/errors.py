"""What the result codec raises: every failure to encode or decode a result is a
:class:`CodecError`, and the advice a refused worker-side value is given."""

from __future__ import annotations


class CodecError(Exception):
    """An object could not be encoded or decoded; the message says which and why."""


class Refused(CodecError):
    """Decoding met something that is not data (a function, a class of a kind that is not
    allowed, bytes of another format): nothing was run."""


class Unresolvable(CodecError):
    """A class named in the data is not available on this side (not imported, or no such name)."""


REFUSAL_ADVICE = (
    "Return data: str, bytes, numbers, None, lists, tuples, dicts, sets, LangChain messages and "
    "documents, pydantic models, dataclasses, namedtuples, Enum members, datetime/UUID/Decimal values, "
    "of classes the client can import. Or, if you trust the pool's workers, pass "
    "trust_workers=True to RunnableK8s (or set RUNNABLE_K8S_TRUST_WORKERS=1) to get any "
    "picklable object back."
)
