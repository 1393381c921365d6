"""The symmetric heap: one arena per rank, identical layout on every rank.

Allocation is collective: every rank allocates the same sizes in the same order, so an
allocation sits at the same offset in every rank's arena and a (offset, rank) pair names
remote memory. :class:`SymArray` is a typed, contiguous window of the arena; indexing it
with ints and unit-step slices on leading axes gives sub-windows (still symmetric).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import HeapExhaustedError, OnesideError

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime

ALIGN = 256

# Storage dtypes by name. bfloat16 is stored as uint16 in numpy/cupy and viewed as
# torch.bfloat16 by SymArray.torch().
_NUMPY_OF = {
    "bfloat16": np.dtype(np.uint16),
}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a numpy/torch/cupy dtype or dtype string (``'bfloat16'`` allowed)."""
    s = str(dtype)
    if s.startswith("torch."):
        s = s[len("torch."):]
    if s in ("bfloat16",):
        return s
    try:
        return np.dtype(s).name
    except TypeError:
        raise TypeError(f"dtype: unsupported dtype {dtype!r}") from None


def storage_dtype(name: str) -> np.dtype:
    return _NUMPY_OF.get(name) or np.dtype(name)


def itemsize(name: str) -> int:
    return storage_dtype(name).itemsize


class Allocator:
    """Deterministic first-fit allocator over ``[base, base + size)`` (offsets only)."""

    def __init__(self, base: int, size: int):
        self.base, self.size = base, size
        self._free: list[tuple[int, int]] = [(base, size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}

    @property
    def used(self) -> int:
        return sum(self._used.values())

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, nbytes: int) -> int:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (off, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, n - need)
                self._used[off] = need
                return off
        raise HeapExhaustedError(
            f"symmetric heap exhausted: asked for {nbytes} bytes, largest free range is "
            f"{self.largest_free} of {self.size} (in use {self.used}); pass a larger "
            f"heap_size to oneside.init() or set ONESIDE_HEAP_SIZE")

    def free(self, off: int) -> None:
        n = self._used.pop(off, None)
        if n is None:
            raise OnesideError(f"free: offset {off} is not an allocation of this heap (double free?)")
        self._free.append((off, n))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for o, k in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + k)
            else:
                merged.append((o, k))
        self._free = merged


class SymArray:
    """A typed, C-contiguous window ``[offset, offset + nbytes)`` of the symmetric heap.

    ``local`` is this rank's memory as a numpy (host backend) or CuPy (GPU) array, no copy;
    ``torch()`` gives a torch tensor over the same memory. The same window on another rank
    is the target or source of put/get with that rank's number.
    """

    __slots__ = ("rt", "offset", "shape", "dtype", "alloc_offset", "_local", "_torch")

    def __init__(self, rt: "Runtime", offset: int, shape: tuple[int, ...], dtype: str, alloc_offset: int):
        self.rt, self.offset, self.shape, self.dtype = rt, offset, tuple(int(s) for s in shape), dtype
        self.alloc_offset = alloc_offset
        self._local = self._torch = None

    # -- geometry ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SymArray(shape={self.shape}, dtype={self.dtype}, offset={self.offset})"

    def _view(self, offset: int, shape: tuple[int, ...], dtype: str | None = None) -> "SymArray":
        return SymArray(self.rt, offset, shape, dtype or self.dtype, self.alloc_offset)

    def __getitem__(self, idx: Any) -> "SymArray":
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) > self.ndim:
            raise IndexError(f"too many indices ({len(idx)}) for a SymArray of {self.ndim} dims")
        strides = [self.itemsize] * self.ndim
        for d in range(self.ndim - 2, -1, -1):
            strides[d] = strides[d + 1] * self.shape[d + 1]
        # The window stays contiguous iff, once an axis of length > 1 is kept, every later
        # indexed axis is kept whole.
        off, shape, kept = self.offset, [], False
        for d, ix in enumerate(idx):
            n = self.shape[d]
            if isinstance(ix, (int, np.integer)):
                i = int(ix) + (n if ix < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {ix} out of range for axis {d} of size {n}")
                if kept:
                    raise IndexError(f"SymArray views must stay contiguous: integer index on axis {d} after a kept axis")
                off += i * strides[d]
            elif isinstance(ix, slice):
                start, stop, step = ix.indices(n)
                if step != 1:
                    raise IndexError("SymArray views must stay contiguous: slice step must be 1")
                length = max(0, stop - start)
                if kept and length != n:
                    raise IndexError(f"SymArray views must stay contiguous: partial slice on axis {d} after a kept axis")
                off += start * strides[d]
                shape.append(length)
                kept = kept or length > 1
            else:
                raise TypeError(f"SymArray index: expected int or slice, got {type(ix).__name__}")
        shape.extend(self.shape[len(idx):])
        return self._view(off, tuple(shape))

    def reshape(self, *shape: int) -> "SymArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) == 1:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.size // known if known else 0
        if math.prod(shape) != self.size:
            raise ValueError(f"reshape: cannot view {self.shape} as {tuple(shape)}")
        return self._view(self.offset, tuple(shape))

    def view(self, dtype: Any) -> "SymArray":
        """The same bytes as another dtype (last axis rescaled)."""
        name = dtype_name(dtype)
        new = itemsize(name)
        last = self.shape[-1] * self.itemsize if self.shape else self.itemsize
        if last % new:
            raise ValueError(f"view: last axis of {last} bytes is not a multiple of {name}'s {new}")
        return self._view(self.offset, (*self.shape[:-1], last // new), name)

    def window(self, start: int, shape: tuple[int, ...] | int) -> "SymArray":
        """Contiguous view of ``prod(shape)`` elements from flat element ``start``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if start < 0 or start + math.prod(shape) > self.size:
            raise IndexError(f"window(start={start}, shape={shape}): outside {self.size} elements")
        return self._view(self.offset + start * self.itemsize, shape)

    # -- memory -----------------------------------------------------------------------
    @property
    def local(self):
        """This rank's memory of the window: numpy (host backend) or CuPy array, no copy."""
        if self._local is None:
            self.rt._check_live(self)
            self._local = self.rt.backend.local_array(self.offset, self.shape, storage_dtype(self.dtype))
        return self._local

    @property
    def ptr(self) -> int:
        """Address of this window in this rank's arena."""
        return self.rt.backend.heap_base + self.offset

    def peer_ptr(self, pe: int) -> int:
        """Address of rank ``pe``'s copy of this window as this rank addresses it (loads and
        stores, e.g. from a kernel); raises where ``pe`` is not mapped (see ``rt.mapped``)."""
        self.rt._check_live(self)
        return self.rt._peer_address(self.offset, pe)

    def peer(self, pe: int):
        """Rank ``pe``'s copy of this window as a numpy (host) or CuPy array, no copy; raises
        where ``pe`` is not mapped. Reading it races the peer's own writes: order them with a
        barrier or signal as for put/get."""
        self.peer_ptr(pe)
        return self.rt.backend.peer_array(self.offset, self.shape, storage_dtype(self.dtype), pe)

    def torch(self):
        """The window as a torch tensor (no copy; bfloat16 windows come back as torch.bfloat16).

        Made once per SymArray and cached: later calls do no DLPack exchange, so they are
        safe inside CUDA-graph capture.
        """
        self.rt._check_live(self)
        if self._torch is None:
            import torch

            t = self.rt.backend.torch_tensor(self.local)
            self._torch = t.view(torch.bfloat16) if self.dtype == "bfloat16" else t
        return self._torch


def join(views: "list[SymArray]", axis: int) -> SymArray | None:
    """One window over ``views`` that lie back to back in one allocation along ``axis``, or None.

    The views must share dtype, allocation and every length but ``axis``'s, have length 1 on all
    axes before ``axis`` (so each is one slab of that axis), and each must start where the previous
    one ends -- e.g. the first rows of consecutive blocks ``buf[i, :, :n]`` when all but the last
    are whole.  No data moves; the result is a view like any other.
    """
    if not views:
        return None
    a0 = views[0]
    for a, b in zip(views, views[1:]):
        if (b.rt is not a0.rt or b.alloc_offset != a0.alloc_offset or b.dtype != a0.dtype
                or b.ndim != a0.ndim or b.shape[:axis] != a0.shape[:axis]
                or b.shape[axis + 1:] != a0.shape[axis + 1:] or b.offset != a.offset + a.nbytes):
            return None
    if any(n != 1 for n in a0.shape[:axis]):
        return None
    shape = list(a0.shape)
    shape[axis] = sum(v.shape[axis] for v in views)
    return a0._view(a0.offset, tuple(shape))
