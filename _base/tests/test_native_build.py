"""The NVSHMEM shim compiles and imports where CUDA headers and the NVSHMEM wheel exist (no GPU needed)."""
from __future__ import annotations

import pytest

from oneside.native import _build


def _toolchain() -> bool:
    try:
        _build.nvshmem_paths()
        _build.cuda_include()
        import cffi  # noqa: F401
    except (RuntimeError, ImportError):
        return False
    return True


@pytest.mark.skipif(not _toolchain(), reason="needs CUDA headers and the nvidia-nvshmem-cu13 wheel")
def test_shim_compiles_and_imports(tmp_path):
    from oneside.native import _import

    so = _build.compile_into(tmp_path)
    assert so.exists() and (tmp_path / f"{_build.MODULE}.key").read_text() == _build.source_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([so.name, f"{_build.MODULE}.key"])
    lib = _import(so).lib
    for fn in ("os_put_batch", "os_get_batch", "os_put_signal_batch", "os_signal_op", "os_quiet",
               "os_barrier_signal", "os_ptr", "os_my_pe"):
        assert callable(getattr(lib, fn))


def test_missing_nvshmem_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NVSHMEM_HOME", "/nonexistent/nvshmem")
    with pytest.raises(RuntimeError, match="NVSHMEM_HOME=/nonexistent/nvshmem has no include/nvshmem.h"):
        _build.compile_into(tmp_path)
