"""Tensor descriptors: (pointer, shape, strides in elements, dtype, device) of GPU arrays.

The kernels only need these five facts, so CuPy arrays, torch tensors (bf16 included, which CuPy
lacks), anything with ``__cuda_array_interface__`` and raw pointers all go through one path,
without copies and without importing torch or CuPy here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "int8": 1, "e4m3": 1}
_TORCH = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
          "torch.float64": "fp64", "torch.int8": "int8", "torch.float8_e4m3fn": "e4m3"}
_NP = {"float16": "fp16", "float32": "fp32", "float64": "fp64", "bfloat16": "bf16"}
_TYPESTR = {"<f2": "fp16", "<f4": "fp32", "<f8": "fp64"}


@dataclass(frozen=True)
class TensorDesc:
    """A strided GPU array: ``ptr`` (int), ``shape``, ``strides`` (elements), ``dtype``
    ('bf16' | 'fp16' | 'fp32' | 'int8' | 'e4m3'), ``device`` (CUDA ordinal)."""

    ptr: int
    shape: tuple
    strides: tuple
    dtype: str
    device: int = 0
    is_torch: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]


def as_desc(x: Any, name: str = "array") -> TensorDesc:
    """Describe ``x`` (TensorDesc, torch tensor, CuPy array or ``__cuda_array_interface__``)."""
    if isinstance(x, TensorDesc):
        return x
    if hasattr(x, "data_ptr") and hasattr(x, "stride"):  # torch.Tensor
        if not x.is_cuda:
            raise ValueError(f"{name} is a CPU torch tensor; the kernels need CUDA tensors")
        dt = _TORCH.get(str(x.dtype))
        if dt is None:
            raise TypeError(f"{name} has unsupported dtype {x.dtype}")
        return TensorDesc(x.data_ptr(), tuple(x.shape), tuple(x.stride()), dt, x.device.index or 0,
                          True)
    data = getattr(x, "data", None)
    if data is not None and hasattr(data, "ptr") and hasattr(x, "strides"):  # cupy.ndarray
        dt = _NP.get(x.dtype.name)
        if dt is None:
            raise TypeError(f"{name} has unsupported dtype {x.dtype}")
        isz = x.dtype.itemsize
        return TensorDesc(data.ptr, tuple(x.shape), tuple(s // isz for s in x.strides), dt,
                          x.device.id)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        dt = _TYPESTR.get(cai["typestr"])
        if dt is None:
            raise TypeError(f"{name} has unsupported typestr {cai['typestr']}")
        shape = tuple(cai["shape"])
        isz = _ITEMSIZE[dt]
        if cai.get("strides") is None:
            st, acc = [], 1
            for s in reversed(shape):
                st.append(acc)
                acc *= s
            strides = tuple(reversed(st))
        else:
            strides = tuple(s // isz for s in cai["strides"])
        return TensorDesc(int(cai["data"][0]), shape, strides, dt, -1)
    raise TypeError(f"{name}: expected a CuPy array, a CUDA torch tensor, a TensorDesc or an object "
                    f"with __cuda_array_interface__, got {type(x).__name__}")
