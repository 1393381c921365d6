"""Backends: ``host`` (CPU processes sharing memory) and ``nvshmem`` (GPUs)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def nvshmem_available() -> bool:
    """True when a CUDA GPU, CuPy and nvshmem4py are importable and usable here."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        import nvshmem.core  # noqa: F401
    except Exception:
        return False
    return True
