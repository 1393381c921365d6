"""Chaos testing: random delays and injected faults at oneside's communication points.

``$ONESIDE_CHAOS="SEED[,P[,MAX_US]]"``: before and after every transfer issue, signal op,
signal wait and barrier (and every kernel launch wrapped with :meth:`Chaos.wrap`), with
probability P (default 0.25) this rank pauses for a random time of up to MAX_US
microseconds (default 2000): the host sleeps (host backend), or a timer kernel holds the
stream and, one time in four, the host sleeps too (GPUs: skews both the device order and
the issue order). The delays of a rank come from ``random.Random(f"{SEED}:{rank}")``, so a run
is reproducible from its seed (up to the OS scheduler).

``$ONESIDE_FAULT="RANK:KIND:SITE:N"``: on rank RANK, at the N-th visit (from 1) of SITE, KIND
happens before the operation: ``die`` (the process kills itself with SIGKILL) or ``raise``
(:class:`~oneside.errors.InjectedFault`; the caller may catch it and go on). SITE is one of
``init``, ``alloc``, ``transfer``, ``signal``, ``wait``, ``barrier``, ``launch``.

Off (neither variable set), nothing is wrapped: the hot paths are untouched.
"""
from __future__ import annotations

import os
import random
import signal
import time
from typing import Any, Callable

from .errors import InjectedFault

SITES = ("init", "alloc", "transfer", "signal", "wait", "barrier", "launch")
KINDS = ("die", "raise")
# backend method -> (site, index of its stream argument or None)
_WRAPPED = {"issue": ("transfer", 1), "transfer": ("transfer", 6), "signal_op": ("signal", 4),
            "signal_wait": ("wait", 3), "wait_next": ("wait", 5), "barrier": ("barrier", 5)}


def parse_chaos(spec: str) -> tuple[int, float, float]:
    """``"SEED[,P[,MAX_US]]"`` -> (seed, probability, max seconds)."""
    try:
        parts = spec.split(",")
        seed = int(parts[0])
        p = float(parts[1]) if len(parts) > 1 else 0.25
        max_us = float(parts[2]) if len(parts) > 2 else 2000.0
    except ValueError:
        raise ValueError(f"ONESIDE_CHAOS={spec!r}: expected 'SEED[,P[,MAX_US]]', e.g. '7,0.3,500'") from None
    if len(parts) > 3 or not 0 <= p <= 1 or max_us < 0:
        raise ValueError(f"ONESIDE_CHAOS={spec!r}: expected 0 <= P <= 1 and MAX_US >= 0")
    return seed, p, max_us / 1e6


def parse_fault(spec: str) -> tuple[int, str, str, int]:
    """``"RANK:KIND:SITE:N"`` -> (rank, kind, site, n)."""
    parts = spec.split(":")
    if len(parts) != 4 or parts[1] not in KINDS or parts[2] not in SITES:
        raise ValueError(f"ONESIDE_FAULT={spec!r}: expected 'RANK:KIND:SITE:N' with KIND in {KINDS} "
                         f"and SITE in {SITES}")
    try:
        rank, n = int(parts[0]), int(parts[3])
    except ValueError:
        raise ValueError(f"ONESIDE_FAULT={spec!r}: RANK and N must be integers") from None
    if n < 1:
        raise ValueError(f"ONESIDE_FAULT={spec!r}: N counts visits from 1")
    return rank, parts[1], parts[2], n


class Chaos:
    """Delays and at most one fault for one rank (see the module docstring)."""

    def __init__(self, rank: int, seed: int | None = None, p: float = 0.0, max_s: float = 0.0,
                 fault: tuple[int, str, str, int] | None = None):
        self.rank, self.p, self.max_s = rank, p, max_s
        self.rng = random.Random(f"{seed}:{rank}")
        self.fault = fault if fault is not None and fault[0] == rank else None
        self.visits = dict.fromkeys(SITES, 0)
        self.delays = 0
        self._hold: Callable[[int, Any], None] | None = None
        self._stream: Callable[[Any], Any] | None = None

    @classmethod
    def from_env(cls, rank: int) -> "Chaos | None":
        spec, fault = os.environ.get("ONESIDE_CHAOS"), os.environ.get("ONESIDE_FAULT")
        if not spec and not fault:
            return None
        seed, p, max_s = parse_chaos(spec) if spec else (0, 0.0, 0.0)
        return cls(rank, seed, p, max_s, parse_fault(fault) if fault else None)

    def attach(self, rt: Any) -> None:
        """Wrap the runtime's backend methods (and ``alloc``) with delay and fault points."""
        be = rt.backend
        if be.is_gpu:
            self._hold, self._stream = be._hold, be.stream_handle
        for name, (site, arg) in _WRAPPED.items():
            setattr(be, name, self._wrap_method(getattr(be, name), site, arg))
        alloc = rt.alloc

        def chaotic_alloc(*a: Any, **k: Any) -> Any:
            self.point("alloc")
            return alloc(*a, **k)

        rt.alloc = chaotic_alloc
        self.point("init")

    def _wrap_method(self, fn: Callable, site: str, arg: int | None) -> Callable:
        def wrapped(*a: Any, **k: Any) -> Any:
            stream = a[arg] if arg is not None and len(a) > arg else k.get("stream")
            self.point(site, stream)
            out = fn(*a, **k)
            self.delay(stream)
            return out
        return wrapped

    def wrap(self, launch: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A kernel launch ``launch(stream)`` with a delay and fault point before it."""
        def wrapped(stream: Any) -> Any:
            self.point("launch", stream)
            return launch(stream)
        return wrapped

    def point(self, site: str, stream: Any = None) -> None:
        """Count a visit of ``site``; fire the fault when it is due, else maybe delay."""
        self.visits[site] += 1
        f = self.fault
        if f is not None and f[2] == site and f[3] == self.visits[site]:
            self.fault = None
            if f[1] == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected fault on rank {self.rank}: raise at {site} visit {f[3]}")
        self.delay(stream)

    def delay(self, stream: Any = None) -> None:
        if self.p <= 0 or self.rng.random() >= self.p:
            return
        t = self.rng.random() * self.max_s
        self.delays += 1
        if self._hold is not None:
            self._hold(int(t * 1e9), self._stream(stream))
            if self.rng.random() < 0.25:
                time.sleep(t)
        else:
            time.sleep(t)
