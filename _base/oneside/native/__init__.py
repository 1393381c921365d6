"""The native shim: batched NVSHMEM host-API calls on raw pointers, built with cffi.

:func:`load` returns the compiled module (``.lib`` and ``.ffi``): the copy built at install
time next to this file when there is one that loads (``pip install`` builds it where CUDA's
headers and the ``nvidia-nvshmem-cu13`` wheel are visible to the build), else one built on
first use into ``$ONESIDE_NATIVE_CACHE`` (default ``~/.cache/oneside``).
``python -m oneside.native`` builds the cached copy ahead of time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import OnesideError
from ._build import HERE, MODULE, compile_into, cuda_include, nvshmem_paths, source_key

_loaded = None


def build_dir() -> Path:
    inc, lib = nvshmem_paths()
    where = hashlib.sha256(f"{inc}|{lib}|{cuda_include()}".encode()).hexdigest()[:8]
    key = f"{source_key()}-{where}"
    cache = Path(os.environ.get("ONESIDE_NATIVE_CACHE", Path.home() / ".cache" / "oneside"))
    return cache / f"shim-{key}"


def build(verbose: bool = False) -> Path:
    """Compile the shim into the cache (no-op if already built); returns the .so path."""
    try:
        out = build_dir()
        found = sorted(out.glob(f"{MODULE}*.so"))
        return found[0] if found else compile_into(out, verbose)
    except RuntimeError as e:
        raise OnesideError(str(e)) from e


def _import(so: Path):
    spec = importlib.util.spec_from_file_location(MODULE, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prebuilt() -> Path | None:
    """The install-time copy next to this file, if it was built from these sources."""
    stamp = HERE / f"{MODULE}.key"
    found = sorted(HERE.glob(f"{MODULE}*.so"))
    if found and stamp.exists() and stamp.read_text().strip() == source_key():
        return found[0]
    return None


def load():
    """Import the shim (install-time copy, else built on first use); ``.lib`` and ``.ffi``."""
    global _loaded
    if _loaded is None:
        so = _prebuilt()
        if so is not None:
            try:
                _loaded = _import(so)
            except ImportError as e:  # built against another NVSHMEM location
                print(f"oneside: install-time shim does not load ({e}); building one", file=sys.stderr)
        if _loaded is None:
            _loaded = _import(build())
    return _loaded
