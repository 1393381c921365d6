"""Exceptions raised by oneside. Every message names the argument or rank at fault."""
from __future__ import annotations


class OnesideError(RuntimeError):
    """Base class of every oneside error."""


class NotInitializedError(OnesideError):
    """A call needs a runtime: call ``oneside.init()`` first (or it was finalized)."""


class HeapExhaustedError(OnesideError, MemoryError):
    """The symmetric heap has no free range large enough for an allocation."""


class CommTimeoutError(OnesideError, TimeoutError):
    """A barrier or signal wait did not complete in time."""


class PeerDeadError(OnesideError):
    """A peer rank exited or was killed while this rank waited for it."""


class CollectiveMismatchError(OnesideError):
    """Ranks disagree on a collective: a barrier met a different call site, or ``agree``
    found different values (e.g. two ranks built layers of different shapes)."""


class InjectedFault(OnesideError):
    """A fault that ``$ONESIDE_FAULT`` asked for (chaos testing); never raised otherwise."""
