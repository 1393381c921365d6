"""Programmatic dependent launch (Hopper+): a kernel launched this way may be scheduled while the
kernel before it on the stream is finishing, saving ~1 us of launch gap per boundary. It must
begin with ``griddepcontrol.wait`` (which returns once the previous grid has completed and its
memory is visible) before it touches anything that grid wrote. oneside's kernels never trigger
their dependents early (the trigger is implicit, at exit): a dependent grid's blocks then never
occupy SMs that a still-running grid - or, on a GPU shared by several ranks, a peer's barrier -
needs.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

__all__ = ["launch"]

_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("val", ctypes.c_ubyte * 64)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("n", ctypes.c_uint)]


_lib = None
_attr = _Attr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
_attr.val[0] = 1


def launch(function: int, grid: Sequence[int], block: Sequence[int], smem: int, stream: int,
           kernel_params: int) -> None:
    """``cuLaunchKernelEx`` of CUfunction ``function`` as a programmatic dependent launch;
    ``kernel_params``: the address of the kernel's ``void *[]`` of parameter addresses."""
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL("libcuda.so.1")
        _lib.cuLaunchKernelEx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    cfg = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, stream,
                  ctypes.pointer(_attr), 1)
    rc = _lib.cuLaunchKernelEx(ctypes.byref(cfg), function, kernel_params, None)
    if rc:
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch): CUresult {rc}")
