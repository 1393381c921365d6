"""The runtime: one per process, between ``oneside.init()`` and ``finalize()``."""
from __future__ import annotations

import atexit
import os
import struct
import sys
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from .bootstrap import Placement, parse_size, placement
from .chaos import Chaos
from .errors import CollectiveMismatchError, NotInitializedError, OnesideError
from .heap import Allocator, SymArray, dtype_name, itemsize
from .mesh import Mesh, Team

_SIGNAL_OPS = ("set", "add")
_CMPS = ("eq", "ne", "gt", "ge", "lt", "le")
BARRIER_SLOTS = 128
GEN_WORDS = 256  # device-side generation counters: barrier slots, then signal_wait_next users
AGREE_WORDS = 32  # per rank in the agreement table: magic, what, field count, fields
_AGREE_MAGIC = 0x5EED
_current: "Runtime | None" = None
_site_tags: dict[tuple[Any, int], int] = {}


def tag(label: str) -> int:
    """The 32-bit call-site tag of ``label`` (for :meth:`Runtime.barrier`'s ``tag``)."""
    return zlib.crc32(label.encode()) or 1


def _caller_tag(depth: int) -> int:
    """Tag of the code location ``depth`` frames up (file and line; cached per location)."""
    f = sys._getframe(depth + 1)
    key = (f.f_code, f.f_lineno)
    t = _site_tags.get(key)
    if t is None:
        t = _site_tags[key] = tag(f"{f.f_code.co_filename}:{f.f_lineno}")
    return t


def _encode(value: Any) -> int:
    """A field value of :meth:`Runtime.agree` as one uint64 word."""
    if isinstance(value, (bool, int, np.integer)):
        return int(value) & 0xFFFFFFFFFFFFFFFF
    if isinstance(value, (float, np.floating)):
        return struct.unpack("<Q", struct.pack("<d", float(value)))[0]
    if isinstance(value, str):
        b = value.encode()
        return int.from_bytes(b.ljust(8, b"\0"), "little") if len(b) <= 8 else zlib.crc32(b) | 1 << 63
    raise TypeError(f"agree: field values must be int, float or str, got {type(value).__name__}")


def _decode(word: int, like: Any) -> str:
    """A peer's word shown as a value of ``like``'s type."""
    if isinstance(like, str):
        if len(like.encode()) > 8:
            return f"(a different string, hash {word:#x})"
        return repr(int(word).to_bytes(8, "little").rstrip(b"\0").decode(errors="replace"))
    if isinstance(like, (float, np.floating)):
        return repr(struct.unpack("<d", struct.pack("<Q", int(word)))[0])
    v = int(word)
    return str(v - (1 << 64) if v >= 1 << 63 else v)


class TransferBatch:
    """Many transfers of one kind (``'put'`` or ``'get'``), validated and packed once.

    Build it at plan time with :meth:`Runtime.batch` and issue it per layer with
    :meth:`issue`: the hot path is one backend call.
    """

    __slots__ = ("rt", "kind", "count", "nbytes", "_handle")

    def __init__(self, rt: "Runtime", kind: str, handle: Any, count: int, nbytes: int):
        self.rt, self.kind, self._handle, self.count, self.nbytes = rt, kind, handle, count, nbytes

    def issue(self, stream: Any = None, nbi: bool = False) -> None:
        """Start every transfer on ``stream`` (complete in stream order unless ``nbi``)."""
        self.rt._check_open()
        self.rt.backend.issue(self._handle, stream, nbi)


class Runtime:
    """Symmetric heap, transfers, signals and barriers of one rank.

    Create it with :func:`oneside.init`. Collective calls (``alloc``, ``free``,
    ``barrier_all``, ``finalize``) must be made by every rank in the same order.
    """

    def __init__(self, backend: Any, place: Placement, timeout: float):
        self.backend, self.place, self.timeout = backend, place, timeout
        self.rank, self.world_size = place.rank, place.world_size
        self.mesh = Mesh(place.machines, place.world_size // place.machines)
        self.world = self.mesh.world
        self._open = True
        self._epochs: dict[int, int] = {}
        self._slot_team: dict[int, tuple[int, ...]] = {}
        # Reserved area at the start of the arena: barrier rows, then the alloc check table.
        self._barrier_bytes = BARRIER_SLOTS * self.world_size * 8
        self._check_off = self._barrier_bytes
        self._gen_off = self._check_off + self.world_size * AGREE_WORDS * 8
        self._gen_next: dict[int, int] = {}     # signal offset -> generation word index
        self._counts: dict[int, int] = {}       # signal offset -> rounds waited (host bookkeeping)
        self._gen_free: list[int] = []          # generation words of freed signal arrays, reusable
        self._gen_count = 0                     # generation words handed out so far
        self._abort_off = self._gen_off + (BARRIER_SLOTS + GEN_WORDS) * 8  # a failed peer's rank + 1
        reserved = self._abort_off + 8
        reserved = -(-reserved // 4096) * 4096
        if reserved >= backend.heap_size:
            raise OnesideError(f"heap_size={backend.heap_size}: too small, need more than {reserved} bytes")
        self.alloc_seq = 0
        self._allocator = Allocator(reserved, backend.heap_size - reserved)
        self._check_area = SymArray(self, self._check_off, (self.world_size, AGREE_WORDS), "uint64", -1)
        self._agree_puts: TransferBatch | None = None
        backend.set_abort_word(self._abort_off)
        self.chaos = Chaos.from_env(self.rank)
        if self.chaos is not None:
            self.chaos.attach(self)

    # -- state ------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def heap_size(self) -> int:
        return self._allocator.size

    @property
    def heap_used(self) -> int:
        return self._allocator.used

    @property
    def heap_largest_free(self) -> int:
        """The largest allocation that would succeed now (bytes)."""
        return self._allocator.largest_free

    @property
    def hosts(self) -> tuple[str, ...]:
        """Host name of every rank: the real machine boundary (the mesh's may be virtual)."""
        return self.backend.hosts

    def same_host(self, a: int, b: int) -> bool:
        """Whether ranks ``a`` and ``b`` run on one physical host."""
        return self.hosts[self._pe(a, "a")] == self.hosts[self._pe(b, "b")]

    def _check_open(self) -> None:
        if not self._open:
            raise NotInitializedError("oneside runtime was finalized; call oneside.init() again")

    def check(self) -> None:
        """Raise the error a GPU-side wait recorded (a mismatched barrier, a timeout, a peer that
        aborted); sticky: once set, every later call raises it. A no-op on the host backend,
        whose waits raise where they happen."""
        self._check_open()
        self.backend.raise_device_error()

    def poison_if_failed(self, a: SymArray, stream: Any = None) -> None:
        """Enqueue on ``stream``: if a GPU-side wait of this rank failed, fill ``a`` with NaN
        (all bits set), so a result computed from a broken collective is never taken as valid."""
        self.backend.poison_if_failed(a.ptr, a.nbytes, stream)

    def _check_live(self, a: SymArray) -> None:
        self._check_open()
        if a.rt is not self:
            raise OnesideError(f"{a!r} belongs to another (finalized?) oneside runtime")
        if a.alloc_offset >= 0 and a.alloc_offset not in self._allocator._used:
            raise OnesideError(f"{a!r} was freed")

    def mapped(self, pe: int) -> bool:
        """Whether rank ``pe``'s heap is load/store addressable from this rank (always on the host
        backend; on GPUs the same GPU or an NVLink/P2P peer), so kernels may read or write it
        through :meth:`SymArray.peer_ptr` instead of put/get."""
        return self.backend.peer_address(0, self._pe(pe)) != 0

    def _peer_address(self, offset: int, pe: int) -> int:
        addr = self.backend.peer_address(offset, self._pe(pe))
        if not addr:
            raise OnesideError(f"pe={pe}: its heap is not mapped into this rank (no NVLink/P2P path); "
                               f"use put/get")
        return addr

    def _pe(self, pe: int, what: str = "pe") -> int:
        if not isinstance(pe, (int, np.integer)) or not 0 <= pe < self.world_size:
            raise ValueError(f"{what}={pe!r}: out of range, expected 0 <= {what} < {self.world_size}")
        return int(pe)

    def _sym(self, a: Any, what: str) -> SymArray:
        if not isinstance(a, SymArray):
            raise TypeError(
                f"{what}: expected a SymArray on the symmetric heap (from rt.alloc()), got "
                f"{type(a).__name__}; remote memory must be symmetric")
        self._check_live(a)
        return a

    def _local(self, a: Any, what: str) -> tuple[int, int]:
        if isinstance(a, SymArray):
            self._check_live(a)
            return a.ptr, a.nbytes
        return self.backend.buffer_info(a, what)

    # -- heap -------------------------------------------------------------------------
    def alloc(self, shape: int | Sequence[int], dtype: Any = "float32", check: bool = True) -> SymArray:
        """Collective: a symmetric array of ``shape`` and ``dtype`` (contents undefined).

        With ``check`` (default), the ranks compare (sequence, offset, size) and raise if
        they did not all make the same allocation.
        """
        self._check_open()
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape={shape}: sizes must be >= 0")
        name = dtype_name(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize(name)
        off = self._allocator.alloc(nbytes)
        self.alloc_seq += 1
        if check:
            try:
                self.agree("alloc", {"number": self.alloc_seq, "bytes": nbytes, "offset": off})
            except Exception:
                self._allocator.free(off)
                raise
        return SymArray(self, off, shape, name, off)

    def free(self, a: SymArray) -> None:
        """Collective: return ``a``'s allocation (``a`` must be the array ``alloc`` gave)."""
        self._sym(a, "a")
        if a.offset != a.alloc_offset:
            raise ValueError("free(a): a is a view; free the array that alloc() returned")
        # signal arrays inside it lose their round count: a later array at the same offset
        # starts from round 0 (its words are zeroed by its owner), not from this one's rounds
        stale = [o for o in self._gen_next if a.offset <= o < a.offset + a.nbytes]
        if stale:
            self.backend.reset_words([self._gen_off + 8 * (BARRIER_SLOTS + self._gen_next[o]) for o in stale])
            for o in stale:
                self._gen_free.append(self._gen_next.pop(o))
                self._counts.pop(o, None)
        self._allocator.free(a.alloc_offset)

    def exchange(self, what: str, values: Sequence[int]) -> np.ndarray:
        """Collective: every rank contributes the same number (up to 29) of non-negative ints
        below 2**63; returns them all as ``int64 [world_size, len(values)]``, row p from rank p.
        Every rank raises :class:`CollectiveMismatchError` if another is in a different
        collective (another ``what`` or count). For plan-time exchanges (sizes), not per call."""
        self._check_open()
        values = [int(v) for v in values]
        if len(values) > AGREE_WORDS - 3:
            raise ValueError(f"exchange: at most {AGREE_WORDS - 3} values, got {len(values)}")
        if any(v < 0 or v >= 1 << 63 for v in values):
            raise ValueError(f"exchange: values must be in [0, 2**63), got {values}")
        row = np.zeros(AGREE_WORDS, np.uint64)
        row[:3] = (_AGREE_MAGIC, _encode(what), len(values))
        row[3:3 + len(values)] = values
        table = self._exchange_rows(row, what)
        return table[:, 3:3 + len(values)].astype(np.int64)

    def _exchange_rows(self, row: np.ndarray, what: str) -> np.ndarray:
        """Every rank's ``AGREE_WORDS`` row (header checked: same collective, same count)."""
        if self.world_size == 1:
            return row[None].copy()
        mine = self._check_area[self.rank]
        self.backend.upload(mine.local, row)
        if self._agree_puts is None:
            others = [p for p in range(self.world_size) if p != self.rank]
            self._agree_puts = self.batch("put", [(mine, p, mine) for p in others], engine="ce")
        self._agree_puts.issue()
        self.barrier_all(tag=_AGREE_TAG)
        self.sync()
        table = self.backend.download(self._check_area.local).copy()
        self.barrier_all(tag=_AGREE_TAG)  # nobody overwrites the table before everyone has read it
        for p in range(self.world_size):
            theirs = table[p]
            if int(theirs[0]) != _AGREE_MAGIC or int(theirs[1]) != int(row[1]) or int(theirs[2]) != int(row[2]):
                raise CollectiveMismatchError(
                    f"{what}: rank {p} is in a different collective ({_decode(int(theirs[1]), what)}, "
                    f"{int(theirs[2])} fields) than rank {self.rank} ({what!r}, {int(row[2])} fields); every "
                    f"rank must make the same collective calls in order")
        return table

    def agree(self, what: str, fields: Mapping[str, Any]) -> None:
        """Collective: every rank passes the same ``what`` and the same ``fields`` values (ints,
        floats or strings) or every rank raises :class:`CollectiveMismatchError` naming the first
        field that differs and the ranks' values. Up to 29 fields."""
        self._check_open()
        if len(fields) > AGREE_WORDS - 3:
            raise ValueError(f"agree: at most {AGREE_WORDS - 3} fields, got {len(fields)}")
        if self.world_size == 1:
            return
        names = list(fields)
        row = np.zeros(AGREE_WORDS, np.uint64)
        row[:3] = (_AGREE_MAGIC, _encode(what), len(names))
        row[3:3 + len(names)] = [_encode(fields[k]) for k in names]
        table = self._exchange_rows(row, what)
        for p in range(self.world_size):
            theirs = table[p]
            if p == self.rank or np.array_equal(theirs, row):
                continue
            for i, k in enumerate(names):
                if int(theirs[3 + i]) != int(row[3 + i]):
                    detail = (f"rank {p} has {k}={_decode(int(theirs[3 + i]), fields[k])}, rank {self.rank} "
                              f"has {k}={fields[k]!r}")
                    if what == "alloc":
                        raise CollectiveMismatchError(
                            f"alloc is not symmetric: {detail}; every rank must allocate the same sizes in "
                            f"the same order")
                    raise CollectiveMismatchError(f"{what} differs between ranks: {detail}")
            raise CollectiveMismatchError(f"{what}: rank {p} passed different fields than rank {self.rank}")

    # -- transfers --------------------------------------------------------------------
    def batch(self, kind: str, transfers: Sequence[tuple[Any, int, Any]], signal: SymArray | None = None,
              signal_value: int = 1, signal_op: str = "add", engine: str | None = None) -> TransferBatch:
        """Validate and pack many transfers for repeated issue.

        ``kind='put'``: each transfer is ``(src_local, pe, dst_sym)``: push local memory
        into ``dst_sym`` on rank ``pe`` (a ScatterPush). ``kind='get'``: each is
        ``(dst_local, pe, src_sym)``: pull ``src_sym`` from rank ``pe`` (a GatherPull).
        Local sides may be SymArrays, numpy/CuPy arrays or torch tensors (contiguous).
        With ``signal`` (puts only), each transfer also applies ``signal_op`` with
        ``signal_value`` to ``signal`` on its target after its data has landed.
        """
        self._check_open()
        if kind not in ("put", "get"):
            raise ValueError(f"kind={kind!r}: expected 'put' or 'get'")
        local, offs, sizes, pes = [], [], [], []
        for i, t in enumerate(transfers):
            if len(t) != 3:
                raise ValueError(f"transfers[{i}]: expected (local, pe, sym), got {len(t)} items")
            loc, pe, sym = t
            pe = self._pe(pe, f"transfers[{i}] pe")
            sym = self._sym(sym, f"transfers[{i}] {'dst' if kind == 'put' else 'src'}")
            ptr, n = self._local(loc, f"transfers[{i}] {'src' if kind == 'put' else 'dst'}")
            if n != sym.nbytes:
                raise ValueError(f"transfers[{i}]: size mismatch, local side has {n} bytes, "
                                 f"symmetric side {sym.nbytes}")
            local.append(ptr)
            offs.append(sym.offset)
            sizes.append(n)
            pes.append(pe)
        sig = None
        if signal is not None:
            if kind != "put":
                raise ValueError("signal: only puts carry a signal (a get completes locally)")
            sig = (self._signal(signal), int(signal_value), self._op(signal_op))
        handle = self.backend.prepare(kind, local, offs, sizes, pes, sig, engine)
        return TransferBatch(self, kind, handle, len(local), sum(sizes))

    def scatter_push(self, transfers: Sequence[tuple[Any, int, SymArray]], stream: Any = None,
                     signal: SymArray | None = None, signal_value: int = 1, signal_op: str = "add",
                     nbi: bool = False) -> None:
        """Push many ``(src_local, pe, dst_sym)`` transfers in one call (see :meth:`batch`)."""
        self.batch("put", transfers, signal, signal_value, signal_op).issue(stream, nbi)

    def gather_pull(self, transfers: Sequence[tuple[Any, int, SymArray]], stream: Any = None,
                    nbi: bool = False) -> None:
        """Pull many ``(dst_local, pe, src_sym)`` transfers in one call (see :meth:`batch`)."""
        self.batch("get", transfers).issue(stream, nbi)

    def _one(self, kind: str, local: Any, pe: int, sym: Any, signal: tuple[int, int, str] | None,
             stream: Any, nbi: bool) -> None:
        self._check_open()
        pe = self._pe(pe)
        sym = self._sym(sym, "dst" if kind == "put" else "src")
        ptr, n = self._local(local, "src" if kind == "put" else "dst")
        if n != sym.nbytes:
            raise ValueError(f"size mismatch: local side has {n} bytes, symmetric side {sym.nbytes}")
        self.backend.transfer(kind, ptr, sym.offset, n, pe, signal, stream, nbi)

    def put(self, dst: SymArray, src: Any, pe: int, stream: Any = None, nbi: bool = False) -> None:
        """Copy local ``src`` into ``dst`` on rank ``pe``."""
        self._one("put", src, pe, dst, None, stream, nbi)

    def get(self, dst: Any, src: SymArray, pe: int, stream: Any = None, nbi: bool = False) -> None:
        """Copy ``src`` on rank ``pe`` into local ``dst``."""
        self._one("get", dst, pe, src, None, stream, nbi)

    def put_signal(self, dst: SymArray, src: Any, pe: int, signal: SymArray, value: int = 1,
                   op: str = "add", stream: Any = None, nbi: bool = False) -> None:
        """Put, then update ``signal`` on ``pe`` once the data is visible there."""
        self._one("put", src, pe, dst, (self._signal(signal), int(value), self._op(op)), stream, nbi)

    def _signal(self, signal: SymArray) -> int:
        s = self._sym(signal, "signal")
        if s.dtype != "uint64" or s.size != 1:
            raise ValueError(f"signal: expected one uint64 element of the heap, got {s!r}")
        return s.offset

    @staticmethod
    def _op(op: str) -> str:
        if op not in _SIGNAL_OPS:
            raise ValueError(f"op={op!r}: expected one of {_SIGNAL_OPS}")
        return op

    def signal_op(self, signal: SymArray, value: int, pe: int, op: str = "set", stream: Any = None) -> None:
        """Set or add ``value`` to ``signal`` on rank ``pe``."""
        self._check_open()
        self.backend.signal_op(self._signal(signal), int(value), self._op(op), self._pe(pe), stream)

    def signal_wait(self, signal: SymArray, value: int, cmp: str = "ge", stream: Any = None,
                    timeout: float | None = None) -> None:
        """Wait until the local ``signal`` compares ``cmp`` to ``value``.

        With a GPU ``stream`` the wait is enqueued on it; with ``stream=None`` the host
        waits (and raises :class:`CommTimeoutError` after ``timeout`` seconds).
        """
        self._check_open()
        if cmp not in _CMPS:
            raise ValueError(f"cmp={cmp!r}: expected one of {_CMPS}")
        self.backend.signal_wait(self._signal(signal), cmp, int(value), stream, timeout)

    def signal_wait_next(self, signals: SymArray, skip: int = -1, stream: Any = None,
                         timeout: float | None = None) -> None:
        """Wait until every word of ``signals`` (but index ``skip``) was raised once more.

        For counters that each writer bumps with ``signal_op(..., 1, op="add")`` once per
        round: the n-th call returns when every word is >= n. The round count lives on the
        GPU (a generation word the wait kernel advances), so a captured CUDA graph that
        replays the wait stays correct; the host backend counts in Python.
        """
        self._check_open()
        s = self._sym(signals, "signals")
        if s.dtype != "uint64" or s.ndim != 1:
            raise ValueError(f"signals: expected a 1-D uint64 array of the heap, got {s!r}")
        if not -1 <= skip < s.size:
            raise ValueError(f"skip={skip}: expected -1 or an index below {s.size}")
        gen = self._gen_next.get(s.offset)
        if gen is None:
            if self._gen_free:
                gen = self._gen_free.pop()
            elif self._gen_count < GEN_WORDS:
                gen, self._gen_count = self._gen_count, self._gen_count + 1
            else:
                raise OnesideError(f"signal_wait_next: more than {GEN_WORDS} distinct live signal arrays waited on")
            self._gen_next[s.offset] = gen
        count = self._counts.get(s.offset, 0) + 1
        self._counts[s.offset] = count
        self.backend.wait_next(s.offset, s.size, skip, self._gen_off + 8 * (BARRIER_SLOTS + gen), count,
                               stream, timeout)

    def quiet(self, stream: Any = None) -> None:
        """Complete every transfer this rank issued on ``stream`` (nbi ones included)."""
        self._check_open()
        self.backend.quiet(stream)

    def barrier(self, team: Team, stream: Any = None, timeout: float | None = None,
                tag: int | None = None, poison: SymArray | None = None, dependent: bool = False) -> None:
        """Barrier over ``team``: prior transfers of each member are complete and visible.

        Every member must reach it from the same call site: ``tag`` (a 32-bit int, see
        :func:`oneside.runtime.tag`; default: the caller's file and line) travels with the
        barrier's signals and a member that arrives with a different one - it skipped or added
        a collective - makes the others raise :class:`CollectiveMismatchError` (on GPUs: the
        wait records it, :meth:`check` raises it and :meth:`poison_if_failed` marks results).
        ``poison``: :meth:`poison_if_failed` on it after the wait, in the barrier's own launch.
        ``dependent``: launch it as a programmatic dependent launch (:mod:`oneside.pdl`: its block
        may be scheduled while the kernel before it on ``stream`` finishes; it waits for that
        kernel before arriving). Where the GPU or the barrier cannot (before Hopper, members not
        all mapped into this GPU, the host backend) it is an ordinary barrier.
        """
        self.check()
        dst = (0, 0) if poison is None else (self._sym(poison, "poison").ptr, poison.nbytes)
        if tag is None:
            tag = _caller_tag(2 if sys._getframe(1).f_code is _BARRIER_ALL_CODE else 1)
        if not isinstance(team, Team):
            raise TypeError(f"team: expected a oneside.Team, got {type(team).__name__}")
        slot = team.slot % BARRIER_SLOTS
        owner = self._slot_team.get(slot)
        if owner is None or team.size == 1:  # validate a team once (1-member teams hold no slot)
            for r in team.ranks:
                self._pe(r, "team rank")
        me = team.index(self.rank)
        if team.size == 1:
            if dst[1]:
                self.backend.poison_if_failed(*dst, stream)
            return
        if owner is None:
            self._slot_team[slot] = team.ranks
        elif owner != team.ranks:
            raise OnesideError(f"teams {owner} and {team.ranks} share barrier slot {slot} on rank "
                               f"{self.rank}; use one of them or reorder its ranks")
        epoch = self._epochs.get(slot, 0) + 1
        self._epochs[slot] = epoch
        self.backend.barrier(slot * self.world_size * 8, team.ranks, me, epoch, self._gen_off + 8 * slot,
                             stream, timeout, int(tag) & 0xFFFFFFFF, dst, dependent)

    def barrier_all(self, stream: Any = None, timeout: float | None = None, tag: int | None = None,
                    poison: SymArray | None = None, dependent: bool = False) -> None:
        """:meth:`barrier` over every rank."""
        self.barrier(self.world, stream, timeout, tag, poison, dependent)

    def sync(self, stream: Any = None, timeout: float | None = None) -> None:
        """Block the host until ``stream`` (GPU; None: the current stream) has finished.

        Raises :class:`CommTimeoutError` after ``timeout`` seconds, or the error a GPU-side wait
        recorded (see :meth:`check`); a no-op on the host backend.
        """
        self._check_open()
        self.backend.sync(stream, timeout)
        self.backend.raise_device_error()

    def close(self, failed: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self.backend.close(failed=failed)


def init(backend: str | None = None, heap_size: int | str | None = None, *, rank: int | None = None,
         world_size: int | None = None, local_rank: int | None = None, machines: int | None = None,
         job: str | None = None, timeout: float | None = None, device: int | None = None) -> Runtime:
    """Start this rank's runtime (collective over all ranks).

    ``backend``: ``'host'`` (CPU processes sharing memory), ``'nvshmem'`` (GPUs) or None
    for ``$ONESIDE_BACKEND``, else nvshmem when a GPU and NVSHMEM are usable, else host.
    Rank and sizes come from the arguments, else torchrun/mpirun/``oneside.launch``
    variables; ``machines`` (or ``$ONESIDE_MACHINES``) splits the ranks into a
    ``machines x gpus_per_machine`` mesh. ``heap_size`` (default ``$ONESIDE_HEAP_SIZE`` or
    256 MiB) is the symmetric arena per rank; ``timeout`` (default ``$ONESIDE_TIMEOUT`` or
    120 s) bounds every host-side wait.
    """
    global _current
    if _current is not None and _current._open:
        raise OnesideError("oneside.init: already initialized in this process; call finalize() first")
    place = placement(rank, world_size, local_rank, machines, job)
    size = parse_size(heap_size if heap_size is not None else os.environ.get("ONESIDE_HEAP_SIZE", "256MiB"))
    if timeout is None:
        timeout = float(os.environ.get("ONESIDE_TIMEOUT", "120"))
    if timeout <= 0:
        raise ValueError(f"timeout={timeout}: expected a positive number of seconds")
    name = backend or os.environ.get("ONESIDE_BACKEND") or _default_backend()
    if name == "host":
        from .backends.host import HostBackend

        be = HostBackend(place.rank, place.world_size, size, place.job, timeout)
    elif name == "nvshmem":
        from .backends.nvshmem import NvshmemBackend

        be = NvshmemBackend(place, size, timeout, device)
    else:
        raise ValueError(f"backend={name!r}: expected 'host' or 'nvshmem'")
    try:
        rt = Runtime(be, place, timeout)
    except BaseException:
        be.close(failed=True)
        raise
    _current = rt
    try:
        rt.barrier_all(tag=tag("oneside.init"))
        rt.sync()
        if hasattr(be, "after_rendezvous"):
            be.after_rendezvous()
    except BaseException:
        rt.close(failed=True)
        _current = None
        raise
    return rt


def _default_backend() -> str:
    from .backends import nvshmem_available

    return "nvshmem" if nvshmem_available() else "host"


def current() -> Runtime:
    """The runtime of this process (NotInitializedError before init / after finalize)."""
    if _current is None or not _current._open:
        raise NotInitializedError("oneside is not initialized: call oneside.init() first")
    return _current


def finalize(failed: bool = False) -> None:
    """Free the heap and leave (collective on success; safe to call twice or on error)."""
    global _current
    rt, _current = _current, None
    if rt is None or not rt._open:
        return
    try:
        if not failed:
            rt.barrier_all(tag=tag("oneside.finalize"))
            rt.sync()
    except BaseException:
        failed = True  # the others may be gone or elsewhere: no collective teardown
        raise
    finally:
        rt.close(failed=failed)


def _at_exit() -> None:
    """At interpreter exit without finalize(): release without a barrier (peers may be gone)."""
    global _current
    rt, _current = _current, None
    if rt is not None and rt._open:
        rt.close(failed=True)


atexit.register(_at_exit)
_AGREE_TAG = tag("oneside.agree")
_BARRIER_ALL_CODE = Runtime.barrier_all.__code__
