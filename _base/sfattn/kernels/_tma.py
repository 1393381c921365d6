"""TMA tensor maps of K/V blocks for the copy engine of Hopper GPUs (``cuTensorMapEncodeTiled``).

A block ``[B, S, H, D]`` (strides in elements, head dim contiguous) is described as a 4-D tensor
(D, S, H, B) -- fastest dimension first -- whose box is 64 columns x ``rows`` keys x 1 head x
1 batch with the 128-byte swizzle, i.e. one 64-column panel of a shared-memory tile in exactly the
layout the wgmma descriptors read.  Keys past ``S`` are filled with zeros by the engine.

The encoder is a plain C function of the driver library; it is called through ctypes (no
dependency beyond the driver that CuPy already loads).  Results are cached by the array's
identity (pointer, shape, strides, dtype) and the box, so prepared launches pay nothing.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from ._build import MAP_SLOTS
from ._desc import TensorDesc

_DTYPES = {"fp16": 6, "bf16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_UINT8, _SWIZZLE_64B = 0, 2
_SWIZZLE_128B, _L2_256B, _INTERLEAVE_NONE, _OOB_ZERO = 3, 3, 0, 0
WORDS = MAP_SLOTS  # a CUtensorMap is 16 x 64-bit words (128 bytes)

_lib = None
_lock = threading.Lock()
_cache: dict = {}
_CACHE_MAX = 4096


def _encoder():
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    lib = ctypes.CDLL("libcuda.so.1")
                except OSError as e:  # pragma: no cover - depends on the machine
                    raise RuntimeError("TMA tensor maps need the CUDA driver (libcuda.so.1)") from e
                f = lib.cuTensorMapEncodeTiled
                f.restype = ctypes.c_int
                f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
                _lib = f
    return _lib


def box_geometry(d: TensorDesc, rows: int) -> tuple[list[int], list[int], list[int]]:
    """(dims, byte strides of dims 1..3, box) of the 4-D map of ``d`` ([B, S, H, D]).

    Dimensions of size 1 get a nominal stride (any multiple of 16 is valid for them).
    """
    B, S, H, D = d.shape
    isz = d.itemsize
    dims = [D, S, H, B]
    strides = []
    for n, s in ((S, d.strides[1]), (H, d.strides[2]), (B, d.strides[0])):
        sb = s * isz
        if n <= 1 or sb <= 0:
            sb = 16
        if sb % 16:
            raise ValueError(f"TMA needs byte strides that are multiples of 16, got {sb} in "
                             f"{d.strides} (elements)")
        strides.append(sb)
    return dims, strides, [64, rows, 1, 1]


def tensor_map(d: TensorDesc, rows: int) -> np.ndarray:
    """The 128-byte tensor map of block ``d`` with a box of ``rows`` keys, as 16 int64 words."""
    if d.dtype not in _DTYPES:
        raise TypeError(f"TMA maps take bf16 or fp16 blocks, got {d.dtype}")
    if not 1 <= rows <= 256:
        raise ValueError(f"TMA box rows must be in [1, 256], got {rows}")
    dims, strides, box = box_geometry(d, rows)
    return encode(d.ptr, _DTYPES[d.dtype], dims, strides, box, _SWIZZLE_128B)


def byte_map(ptr: int, dims: list[int], strides: list[int], box: list[int]) -> np.ndarray:
    """The tensor map of a 4-D byte tensor (int8 / e4m3 operands of the FP8 kernel): ``dims``
    fastest first, byte ``strides`` of dims 1..3, ``box`` (its first extent, 64 or 128 bytes, is
    the width of the swizzle)."""
    if box[0] not in (64, 128):
        raise ValueError(f"byte maps have rows of 64 or 128 bytes, got a box of {box}")
    return encode(ptr, _UINT8, dims, strides, box, _SWIZZLE_128B if box[0] == 128 else _SWIZZLE_64B)


def encode(ptr: int, dtype: int, dims: list[int], strides: list[int], box: list[int],
           swizzle: int) -> np.ndarray:
    """``cuTensorMapEncodeTiled`` of a 4-D tiled map (cached by its arguments), as 16 int64 words."""
    key = (ptr, dtype, tuple(dims), tuple(strides), tuple(box), swizzle)
    m = _cache.get(key)
    if m is not None:
        return m
    if ptr % 16:
        raise ValueError(f"TMA needs 16-byte aligned blocks, got pointer {ptr:#x}")
    if any(s % 16 for s in strides):
        raise ValueError(f"TMA needs byte strides that are multiples of 16, got {strides}")
    out = np.zeros(WORDS + 8, dtype=np.int64)  # over-allocate to place the map 64-byte aligned
    off = (-out.ctypes.data % 64) // 8
    m = out[off:off + WORDS]
    c_dims = (ctypes.c_uint64 * 4)(*dims)
    c_strides = (ctypes.c_uint64 * 3)(*strides)
    c_box = (ctypes.c_uint32 * 4)(*box)
    c_elem = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    rc = _encoder()(m.ctypes.data, dtype, 4, ptr, c_dims, c_strides, c_box, c_elem,
                    _INTERLEAVE_NONE, swizzle, _L2_256B, _OOB_ZERO)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for dims {dims}, byte "
                           f"strides {strides}, box {box}, data type {dtype}")
    m = m.copy()
    if len(_cache) >= _CACHE_MAX:
        _cache.pop(next(iter(_cache)))
    _cache[key] = m
    return m
