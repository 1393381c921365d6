"""Building the native shim with cffi; no package imports, so ``setup.py`` can load it by path."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = "_oneside_shim"


def nvshmem_paths() -> tuple[Path, Path]:
    """(include dir, lib dir) of the NVSHMEM wheel (``$NVSHMEM_HOME`` overrides)."""
    home = os.environ.get("NVSHMEM_HOME")
    if home:
        if not (Path(home) / "include" / "nvshmem.h").exists():
            raise RuntimeError(f"native shim: NVSHMEM_HOME={home} has no include/nvshmem.h")
        return Path(home) / "include", Path(home) / "lib"
    try:
        import nvidia.nvshmem as nv  # the nvidia-nvshmem-cu13 wheel
    except ImportError as e:
        raise RuntimeError("native shim: NVSHMEM not found; install nvidia-nvshmem-cu13 or set NVSHMEM_HOME") from e
    root = Path(list(nv.__path__)[0])
    return root / "include", root / "lib"


def cuda_include() -> Path:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    raise RuntimeError("native shim: CUDA headers (cuda_runtime.h) not found; set CUDA_HOME")


def source_key() -> str:
    """Identifies the shim's sources and the Python it is built for."""
    src = b"".join(p.read_bytes() for p in (HERE / "shim.cpp", HERE / "shim.h"))
    return hashlib.sha256(src + sys.version.encode()).hexdigest()[:16]


def compile_into(out: Path, verbose: bool = False) -> Path:
    """Compile the shim into ``out``; returns the .so path (RuntimeError if it cannot)."""
    import cffi

    inc, lib = nvshmem_paths()
    cuda = cuda_include()
    ffi = cffi.FFI()
    ffi.cdef("".join(l for l in (HERE / "shim.h").read_text().splitlines(True) if not l.startswith("#")))
    ffi.set_source(
        MODULE, (HERE / "shim.cpp").read_text(), source_extension=".cpp",
        include_dirs=[str(HERE), str(inc), str(cuda), str(cuda / "cccl")],
        library_dirs=[str(lib)], extra_link_args=["-l:libnvshmem_host.so.3", f"-Wl,-rpath,{lib}"],
        extra_compile_args=["-O2", "-std=c++17", "-w"])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oneside-shim-") as tmp:  # keep only the .so
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=verbose))
        except Exception as e:
            raise RuntimeError(f"native shim: build failed: {e}") from e
        so = out / built.name
        shutil.copy2(built, so)
    (out / f"{MODULE}.key").write_text(source_key())
    return so
