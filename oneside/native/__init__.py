"""The native shim: batched NVSHMEM host-API calls on raw pointers, built with cffi.

:func:`load` returns the compiled module (``.lib`` and ``.ffi``), building it on first use
into ``$ONESIDE_NATIVE_CACHE`` (default ``~/.cache/oneside``) against the NVSHMEM headers
and ``libnvshmem_host.so.3`` of the ``nvidia-nvshmem-cu13`` wheel and CUDA's headers.
``python -m oneside.native`` builds it ahead of time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import OnesideError

_HERE = Path(__file__).resolve().parent
_MODULE = "_oneside_shim"
_loaded = None


def nvshmem_paths() -> tuple[Path, Path]:
    """(include dir, lib dir) of the NVSHMEM wheel (``$NVSHMEM_HOME`` overrides)."""
    home = os.environ.get("NVSHMEM_HOME")
    if home:
        return Path(home) / "include", Path(home) / "lib"
    try:
        import nvidia.nvshmem as nv  # the nvidia-nvshmem-cu13 wheel
    except ImportError as e:
        raise OnesideError("native shim: NVSHMEM not found; install nvidia-nvshmem-cu13 or set NVSHMEM_HOME") from e
    root = Path(list(nv.__path__)[0])
    return root / "include", root / "lib"


def cuda_include() -> Path:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    raise OnesideError("native shim: CUDA headers (cuda_runtime.h) not found; set CUDA_HOME")


def _ffi(inc: Path, lib: Path, cuda: Path):
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("".join(l for l in (_HERE / "shim.h").read_text().splitlines(True) if not l.startswith("#")))
    ffi.set_source(
        _MODULE, (_HERE / "shim.cpp").read_text(), source_extension=".cpp",
        include_dirs=[str(_HERE), str(inc), str(cuda), str(cuda / "cccl")],
        library_dirs=[str(lib)], extra_link_args=["-l:libnvshmem_host.so.3", f"-Wl,-rpath,{lib}"],
        extra_compile_args=["-O2", "-std=c++17", "-w"])
    return ffi


def build_dir() -> Path:
    inc, lib = nvshmem_paths()
    cuda = cuda_include()
    key = hashlib.sha256(b"".join(p.read_bytes() for p in (_HERE / "shim.cpp", _HERE / "shim.h"))
                         + f"{inc}{lib}{cuda}{sys.version}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ONESIDE_NATIVE_CACHE", Path.home() / ".cache" / "oneside"))
    return cache / f"shim-{key}"


def build(verbose: bool = False) -> Path:
    """Compile the shim into the cache (no-op if already built); returns the .so path."""
    inc, lib = nvshmem_paths()
    out = build_dir()
    found = sorted(out.glob(f"{_MODULE}*.so"))
    if found:
        return found[0]
    out.mkdir(parents=True, exist_ok=True)
    try:
        so = _ffi(inc, lib, cuda_include()).compile(tmpdir=str(out), verbose=verbose)
    except Exception as e:
        raise OnesideError(f"native shim: build failed in {out}: {e}") from e
    return Path(so)


def load():
    """Build if needed and import the shim; returns the cffi module (``.lib``, ``.ffi``)."""
    global _loaded
    if _loaded is None:
        so = build()
        spec = importlib.util.spec_from_file_location(_MODULE, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _loaded = mod
    return _loaded
