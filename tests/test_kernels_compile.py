"""Compile every attention-kernel configuration with nvcc (no GPU needed); skip without nvcc."""
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from sfattn.kernels import _build

NVCC = _build.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _compile(cfg, tmp_path):
    out = tmp_path / f"{cfg.impl}_{cfg.head_dim}_{cfg.dtype}_{cfg.arch}.cubin"
    res = subprocess.run([NVCC, *cfg.nvcc_args(out), "-Xptxas", "-v"], capture_output=True,
                         text=True)
    return cfg, out, res


def test_all_configurations_compile_without_spills(tmp_path):
    cfgs = _build.all_configs() + [_build.KernelConfig("sm90ws", d, "bf16", "sm_90a", 128)
                                   for d in (64, 128)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(lambda c: _compile(c, tmp_path), cfgs))
    for cfg, out, res in results:
        assert res.returncode == 0, f"{cfg}:\n{res.stderr}"
        assert out.stat().st_size > 0
        log = res.stdout + res.stderr
        if cfg.impl != "merge":
            assert "0 bytes spill stores" in log, f"{cfg} spills registers:\n{log}"
        if cfg.impl in ("sm90", "sm90ws"):
            # the compiler must not serialise the wgmma pipeline behind our back
            assert "C7510" not in log and "C7515" not in log and "C7508" not in log, log


def test_sm90_kernel_uses_wgmma(tmp_path):
    cfg = _build.KernelConfig("sm90", 128, "bf16", "sm_90a")
    ptx = _build.compile_kernel(cfg, tmp_path / "k.ptx", fmt="ptx")
    text = ptx.read_text()
    assert "wgmma.mma_async" in text and "cp.async" in text


def test_cache_reuses_the_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("SFATTN_CACHE", str(tmp_path / "cache"))
    cfg = _build.KernelConfig("merge", 0, "fp32", "sm_80")
    a = _build.compile_kernel(cfg)
    mtime = a.stat().st_mtime_ns
    b = _build.compile_kernel(cfg)
    assert a == b and b.stat().st_mtime_ns == mtime
