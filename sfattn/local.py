"""Local attention for the algorithms: the same multi-block contract on CPU and GPU.

``prepare(...)`` packs one ``attn_blocks`` call at plan time and returns a function of the
stream that launches it, so the per-chunk hot path does no Python work beyond the call.
On the host backend this is the numpy reference (float64 math); on GPUs the fused kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from . import reference
from .reference import AttnState

_KERNEL_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _rows(block: Any) -> tuple[Any, int | None]:
    """A block is a SymArray ``[B, S, H, D]`` or ``(SymArray, n)``: its first n rows."""
    return block if isinstance(block, tuple) else (block, None)


class HostAttention:
    """numpy reference kernels (CPU, float64 math)."""

    xp = np

    @staticmethod
    def view(block: Any):
        a, n = _rows(block)
        a = a.local if hasattr(a, "rt") else a
        return a if n is None else a[:, :n]

    def state(self, B: int, S: int, H: int, D: int) -> AttnState:
        return AttnState.empty(B, S, H, D, xp=np, dtype=np.float64)

    def prepare(self, q: Sequence[Any], k: Sequence[Any], v: Sequence[Any], state: AttnState, scale: float,
                init: bool, finalize: bool, out: Sequence[Any] | None = None) -> Callable[[Any], None]:
        q, k, v = ([self.view(b) for b in x] for x in (q, k, v))
        out = None if out is None else [self.view(b) for b in out]

        def run(stream: Any = None) -> None:
            reference.attn_blocks(q, k, v, state, scale, init=init, finalize=finalize, out=out)
        return run


class GpuAttention:
    """The fused CUDA kernel (:mod:`sfattn.kernels`) on symmetric-heap views."""

    def __init__(self, device: int):
        import cupy

        self.xp = cupy
        self.device = device

    def state(self, B: int, S: int, H: int, D: int) -> AttnState:
        return AttnState.empty(B, S, H, D, xp=self.xp, dtype=self.xp.float32)

    def desc(self, block: Any):
        """A kernel descriptor of a (SymArray, rows) block (bf16 included) or a GPU array."""
        from .kernels import TensorDesc, as_desc

        a, n = _rows(block)
        if not hasattr(a, "rt"):
            return as_desc(a)
        strides, acc = [], 1
        for s in reversed(a.shape):
            strides.insert(0, acc)
            acc *= s
        shape = tuple(a.shape) if n is None else (a.shape[0], n, *a.shape[2:])
        return TensorDesc(a.ptr, shape, tuple(strides), _KERNEL_DTYPES[a.dtype], self.device)

    def prepare(self, q, k, v, state, scale, init, finalize, out=None):
        from .kernels import AttnLaunch

        launch = AttnLaunch([self.desc(x) for x in q], [self.desc(x) for x in k], [self.desc(x) for x in v],
                            state, scale, out=None if out is None else [self.desc(x) for x in out],
                            init=init, finalize=finalize)

        def run(stream: Any = None) -> None:
            launch(init=init, finalize=finalize, stream=stream)
        return run
