"""Compile every attention-kernel configuration with nvcc (no GPU needed; skipped without nvcc),
plus CPU checks of the launcher logic (kernel selection, parameter packing) with a fake device."""
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from sfattn.kernels import _build

NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _compile(cfg, tmp_path):
    tag = abs(hash((cfg.bn, cfg.opts)))
    out = tmp_path / f"{cfg.impl}_{cfg.head_dim}_{cfg.dtype}_{cfg.arch}_{tag}.cubin"
    res = subprocess.run([NVCC, *cfg.nvcc_args(out), "-Xptxas", "-v"], capture_output=True,
                         text=True)
    return cfg, out, res


@needs_nvcc
def test_all_configurations_compile_without_spills(tmp_path):
    cfgs = _build.all_configs() + [_build.KernelConfig("sm90ws", d, "bf16", "sm_90a", 128, (("CL", 1),) if d == 128 else ())
                                   for d in (64, 128)] + \
        [_build.KernelConfig("sm90ws", d, "fp16", "sm_90a", opts=(("TMA", 0),)) for d in (64, 128)] + \
        [_build.KernelConfig("sm90ws", 64, dt, "sm_90a", opts=(("NC", 2),)) for dt in ("bf16", "fp16")] + \
        [_build.KernelConfig("sm90ws", 128, dt, "sm_90a", opts=(("CL", 2),)) for dt in ("bf16", "fp16")] + \
        [_build.KernelConfig("sm90fp8", d, "bf16", "sm_90a", opts=o) for d in (64, 128)
         for o in ((("KST", 2), ("VST", 2)), (("PERSIST", 1),))] + \
        [_build.KernelConfig("sm90fp8", 64, "bf16", "sm_90a", opts=(("NC", 2), ("DB", 0))),
         _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("PX", 2),)),
         _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("BN", 128),)),
         _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("BN", 128), ("PERSIST", 1))),
         _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("BN", 128), ("PV", 16))),
         _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("OV", 0),))] + \
        [_build.KernelConfig("sm90fp8", d, dt, "sm_90a", opts=(("PV", 16),)) for d in (64, 128) for dt in ("bf16", "fp16")]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(lambda c: _compile(c, tmp_path), cfgs))
    for cfg, out, res in results:
        assert res.returncode == 0, f"{cfg}:\n{res.stderr}"
        assert out.stat().st_size > 0
        log = res.stdout + res.stderr
        if cfg.impl != "merge":
            assert "0 bytes spill stores" in log, f"{cfg} spills registers:\n{log}"
        if cfg.impl in ("sm90ws", "sm90fp8"):
            # the compiler must not serialise the wgmma pipeline behind our back
            assert "C7510" not in log and "C7515" not in log and "C7508" not in log, log
            assert "C7520" not in log, log
        if cfg.impl == "sm90fp8":  # no compiler-injected warpgroup.arrive either
            assert "C7519" not in log, log


def _cuobjdump():
    import shutil
    near = os.path.join(os.path.dirname(NVCC), "cuobjdump") if NVCC else None
    return near if near and os.access(near, os.X_OK) else shutil.which("cuobjdump")


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found (a full CUDA toolkit has it)")
def test_fp8_softmax_sits_between_the_two_waits(tmp_path):
    """The FP8 default build at head dim 128 (OV=1): every exponential of the softmax of S_t lies
    between the wait for S_t (wgmma.wait_group 1) and the wait for P_{t-1}.V_{t-1} (wait_group 0),
    so the softmax overlaps that GEMM inside the warpgroup. Without sf_sched_fence ptxas hoists the
    second wait above the softmax (docs/kernel-notes.md)."""
    cfg = _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a")
    assert cfg.fp8_ov == 1
    cubin = _build.compile_kernel(cfg, tmp_path / "k.cubin")
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    sites, n = [], None
    for line in sass.splitlines():
        if "DEPBAR.LE gsb0, 0x1" in line:
            n = 0
        elif "DEPBAR.LE gsb0, 0x0" in line:
            if n is not None:
                sites.append(n)
            n = None
        elif n is not None and "MUFU.EX2" in line:
            n += 1
    # 96 exponentials per row pair of a 192-key tile, plus the two rescale factors
    assert sites and max(sites) >= 96, sites


@needs_nvcc
def test_sm90ws_kernel_uses_wgmma_and_tma(tmp_path):
    cfg = _build.KernelConfig("sm90ws", 128, "bf16", "sm_90a")
    text = _build.compile_kernel(cfg, tmp_path / "k.ptx", fmt="ptx").read_text()
    assert "wgmma.mma_async" in text and "cp.async.bulk.tensor.4d" in text
    assert ".param .align 64 .b8 sf_attn_sm90ws_param_0[%d]" % (8 * cfg.param_slots) in text
    cfg = _build.KernelConfig("sm90ws", 128, "bf16", "sm_90a", opts=(("TMA", 0),))
    text = _build.compile_kernel(cfg, tmp_path / "k0.ptx", fmt="ptx").read_text()
    assert "cp.async.bulk.tensor" not in text and "cp.async.cg.shared.global" in text


@needs_nvcc
def test_sm90fp8_kernel_uses_8bit_wgmma_and_byte_maps(tmp_path):
    """The FP8 kernel: int8 Q.K into int32, e4m3 P.V from registers with eight more B rows (the ones
    whose columns are P's row sums, knob LS) or without them (LS=0), P converted by cvt.e4m3x2, its
    parameter struct as large as the host packs (SfParams, maps, side arrays), its V slots D + 8 rows
    deep with LS."""
    for d in (64, 128):
        cfg = _build.KernelConfig("sm90fp8", d, "bf16", "sm_90a")
        text = _build.compile_kernel(cfg, tmp_path / f"f{d}.ptx", fmt="ptx").read_text()
        bn = cfg.fp8_bn  # 192-key tiles at head dim 128, 128 at 64
        assert bn == {64: 128, 128: 192}[d]
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k32.s32.s8.s8" in text
        assert cfg.fp8_ls == 1
        assert f"wgmma.mma_async.sync.aligned.m64n{d + 8}k32.f32.e4m3.e4m3" in text
        assert "cvt.rn.satfinite.e4m3x2.f32" in text and "ex2.approx.ftz.f32" in text
        assert ".param .align 64 .b8 sf_attn_sm90fp8_param_0[%d]" % (8 * cfg.param_slots) in text
        kst, vst = cfg.fp8_slots()
        assert cfg.smem_bytes == cfg.block_m * d + (kst * d + vst * (d + 8)) * bn + 1024 <= _build.SMEM_MAX
        c0 = _build.KernelConfig("sm90fp8", d, "bf16", "sm_90a", opts=(("LS", 0),))
        t0 = _build.compile_kernel(c0, tmp_path / f"f{d}ls0.ptx", fmt="ptx").read_text()
        assert f"wgmma.mma_async.sync.aligned.m64n{d}k32.f32.e4m3.e4m3" in t0 and f"m64n{d + 8}k32" not in t0
        assert c0.smem_bytes == c0.block_m * d + sum(c0.fp8_slots()) * bn * d + 1024
        # precision="fp8-accurate" (PV=16): the same int8 Q.K, P.V as a 16-bit wgmma, V in 16-bit slots
        c16 = _build.KernelConfig("sm90fp8", d, "bf16", "sm_90a", opts=(("PV", 16),))
        t16 = _build.compile_kernel(c16, tmp_path / f"f{d}pv16.ptx", fmt="ptx").read_text()
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k32.s32.s8.s8" in t16
        assert f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.bf16.bf16" in t16 and "e4m3" not in t16
        assert c16.smem_bytes == c16.block_m * d + (c16.fp8_slots()[0] + 2 * c16.fp8_slots()[1]) * bn * d + 1024
        assert c16.smem_bytes <= _build.SMEM_MAX and c16.fp8_slots()[1] == (2 if d == 128 else 4)
    # S seeded with the float-magic constant (MI, the default): no integer add of it per logit
    magic_adds = lambda t: sum("add.s32" in ln and "1262485504" in ln for ln in t.splitlines())  # noqa: E731
    tm0 = _build.compile_kernel(_build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("MI", 0),)),
                                tmp_path / "mi0.ptx", fmt="ptx").read_text()
    assert magic_adds(text) == 0 and magic_adds(tm0) > 0 and "-DF8_MI=1" in cfg.defines()
    with pytest.raises(ValueError, match="NC"):
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("NC", 4),)).threads
    # the timeline build of perf/trace_fp8.py: clock64 stores into the module's f8_trace, and only there
    tr = _build.compile_kernel(_build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("TR", 1),)),
                               tmp_path / "tr.ptx", fmt="ptx").read_text()
    assert "f8_trace" in tr and "%clock64" in tr and "f8_trace" not in text
    with pytest.raises(ValueError, match="DG"):  # GEMMs left out: only in the timeline build
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("DG", 1),)).defines()
    dg = _build.compile_kernel(_build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("TR", 1), ("DG", 2))),
                               tmp_path / "dg.ptx", fmt="ptx").read_text()
    assert "wgmma.mma_async" not in dg and "f8_trace" in dg
    # a GEMM left out still takes P (a sink deciding a store), or ptxas drops the exponentials
    dg1 = _build.compile_kernel(_build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("TR", 1), ("DG", 1))),
                                tmp_path / "dg1.ptx", fmt="ptx").read_text()
    assert "e4m3.e4m3" not in dg1 and "2134646107" in dg1 and "2134646107" not in tr  # the sink's 0x7F3C1D5B
    # MX: the group maxima of S as integer maxima of its bits (3-input, VIMNMX3 on sm_90)
    tmx = _build.compile_kernel(_build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("MX", 1),)),
                                tmp_path / "mx.ptx", fmt="ptx").read_text()
    assert tmx.count("max.s32") >= 90 and tmx.count("max.f32") < text.count("max.f32") - 80
    with pytest.raises(ValueError, match="LS"):  # the row sums need the e4m3 P.V
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("LS", 1), ("PV", 16))).defines()
    with pytest.raises(ValueError, match="PV"):
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("PV", 4),)).smem_bytes
    with pytest.raises(ValueError, match="BN"):
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("BN", 160),)).smem_bytes
    with pytest.raises(ValueError, match="shared memory.*KST, VST"):  # 16-bit V at 192 keys: 3 + 3 slots do not fit
        _build.KernelConfig("sm90fp8", 128, "bf16", "sm_90a", opts=(("BN", 192), ("PV", 16), ("VST", 3)))


@needs_nvcc
def test_exp2_is_one_mufu_and_knobs_reach_the_source(tmp_path):
    """exp2f without -ftz costs a range check and two multiplies per element: the kernels use
    ex2.approx.ftz; EX2=0 restores exp2f, NC=3 builds 512-thread blocks of 192 Q rows."""
    cfg = _build.KernelConfig("sm90ws", 64, "bf16", "sm_90a")
    text = _build.compile_kernel(cfg, tmp_path / "a.ptx", fmt="ptx").read_text()
    assert "ex2.approx.ftz.f32" in text and "ex2.approx.f32" not in text
    cfg = _build.KernelConfig("sm90ws", 64, "bf16", "sm_90a", opts=(("EX2", 0), ("RT", 0)))
    assert "-DSF_EX2_FTZ=0" in cfg.defines() and "-DSF_RESCALE_THR=0" in cfg.defines()
    text = _build.compile_kernel(cfg, tmp_path / "b.ptx", fmt="ptx").read_text()
    assert "ex2.approx.f32" in text
    cfg = _build.KernelConfig("sm90ws", 64, "bf16", "sm_90a", opts=(("NC", 3),))
    assert (cfg.threads, cfg.block_m, cfg.ws_tiles()[0]) == (512, 192, 128)
    assert "-DWS_CONSUMER_REGS=160" in cfg.defines()
    text = _build.compile_kernel(cfg, tmp_path / "c.ptx", fmt="ptx").read_text()
    assert ".maxntid 512" in text
    with pytest.raises(ValueError, match="NC"):
        _build.KernelConfig("sm90ws", 64, "bf16", "sm_90a", opts=(("NC", 4),)).threads
    cfg = _build.KernelConfig("sm90ws", 128, "bf16", "sm_90a", opts=(("CL", 2),))
    text = _build.compile_kernel(cfg, tmp_path / "d.ptx", fmt="ptx").read_text()
    assert ".multicast::cluster" in text and ".reqnctapercluster 2, 1, 1" in text
    for d, bad in ((64, (("CL", 2),)), (128, (("CL", 2), ("TMA", 0))),
                   (128, (("CL", 2), ("PERSIST", 1)))):
        with pytest.raises(ValueError, match="CL"):
            _build.KernelConfig("sm90ws", d, "bf16", "sm_90a", opts=bad).defines()


@needs_nvcc
def test_cache_reuses_the_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("SFATTN_CACHE", str(tmp_path / "cache"))
    cfg = _build.KernelConfig("merge", 0, "fp32", "sm_80")
    a = _build.compile_kernel(cfg)
    mtime = a.stat().st_mtime_ns
    b = _build.compile_kernel(cfg)
    assert a == b and b.stat().st_mtime_ns == mtime
    # a changed default (a define the configuration's fields do not show) is a different cubin
    real = _build.KernelConfig.defines
    monkeypatch.setattr(_build.KernelConfig, "defines", lambda self: [*real(self), "-DSOME_NEW_DEFAULT=1"])
    assert _build.compile_kernel(cfg) != a


class _FakeKernel:
    def __init__(self, cfg, dev):
        self.cfg, self.threads, self.smem, self.block_m = cfg, cfg.threads, cfg.smem_bytes, cfg.block_m
        self.sms = 132


@pytest.fixture
def fake_device(monkeypatch):
    from sfattn.kernels import flash
    monkeypatch.setattr(flash, "_device_cc", lambda dev: 90)
    monkeypatch.setattr(flash, "_Kernel", _FakeKernel)
    monkeypatch.setattr(flash, "_kernels", {})
    return flash


def test_kernel_selection_and_impl_names(fake_device):
    flash = fake_device
    assert flash.get_kernel("merge", 0, "bf16", 0).cfg.impl == "merge"
    k = flash.get_kernel("sm90ws", 128, "bf16", 0).cfg
    assert (k.impl, k.arch, k.ws_tiles()) == ("sm90ws", "sm_90a", _build.WS_TILES[(128, _build.WS_CONSUMERS[128])])
    k = flash.get_kernel("sm90ws:BN=128,PP=0", 64, "fp16", 0).cfg
    assert k.ws_tiles()[0] == 128 and "-DWS_PP=0" in k.defines()
    assert flash.get_kernel("fa2", 64, "bf16", 0).cfg.arch == "sm_90a"
    for bad in ("sm91", "sm90ws:XX=1", "sm90ws:BN=a"):
        with pytest.raises(ValueError, match="impl"):
            flash._parse_impl(bad)
    for cfg in _build.all_configs():
        if cfg.impl != "merge":
            assert cfg.smem_bytes <= 227 * 1024 - 1024, cfg


def test_parameter_packing(fake_device):
    flash = fake_device
    from sfattn.kernels import TensorDesc
    from sfattn.reference import AttnState

    def td(S, ptr, dt="bf16", D=128, H=3):
        return TensorDesc(ptr, (2, S, H, D), (S * H * D, H * D, D, 1), dt, 0)
    st = AttnState(td(300, 1 << 20, "fp32"), TensorDesc(2 << 20, (2, 3, 300), (900, 300, 1), "fp32"),
                   TensorDesc(3 << 20, (2, 3, 300), (900, 300, 1), "fp32"))
    qs = [td(100, 4096), td(0, 8192), td(200, 12288)]
    ks = [td(5, 16384), td(0, 20480), td(1000, 24576)]
    outs = [td(100, 28672), td(0, 32768), td(200, 36864)]
    launch = flash.AttnLaunch(qs, ks, ks, st, 0.5, out=outs, impl="sm90ws:TMA=0", finalize=True)
    (p, _argv, _argp, grid, first, last), = launch._launches
    # 100 rows -> 1 tile, 200 rows -> 2 tiles (BM 128); x 3 heads on grid.x, batch 2 on grid.z
    assert grid == ((1 + 2) * 3, 1, 2) and first and last
    assert (p[0], p[1], p[2]) == (2, 2, 3)  # empty blocks dropped
    assert abs(p[4:5].view("float64")[0] - 0.5 * flash.LOG2E) < 1e-12
    q1 = p[flash._HDR + flash._QF: flash._HDR + 2 * flash._QF]
    assert list(q1) == [12288, 36864, 200 * 3 * 128, 384, 128,
                        200 * 3 * 128, 384, 128, 200, 1, 100]
    kv1 = p[flash._HDR + _build.MAXQ * flash._QF + flash._KVF:][:flash._KVF]
    assert list(kv1) == [24576, 24576, 1000 * 384, 384, 128, 1000 * 384, 384, 128, 1000]
    with pytest.raises(ValueError, match="head_dim"):
        flash.AttnLaunch([td(8, 0, D=96)], [td(8, 0, D=96)], [td(8, 0, D=96)], None, 1.0,
                         out=[td(8, 0, D=96)], finalize=True)
    with pytest.raises(ValueError, match="aligned"):
        flash.AttnLaunch([TensorDesc(4098, (2, 8, 2, 64), (1024, 128, 64, 1), "bf16")],
                         [td(8, 0, D=64, H=2)], [td(8, 0, D=64, H=2)], None, 1.0,
                         out=[td(8, 0, D=64, H=2)], finalize=True)
    with pytest.raises(ValueError, match="not an attention kernel"):
        flash.AttnLaunch(qs, ks, ks, st, 0.5, impl="merge")


def test_tma_maps_are_packed_after_the_block_tables(fake_device, monkeypatch):
    """The default Hopper kernel gets one tensor map per K and V block: (D, S, H, B) dims, byte
    strides of S, H, B, a 64 x BN box; slots follow the int64 layout of SfParams."""
    flash = fake_device
    from sfattn.kernels import TensorDesc, _tma
    calls = []

    def fake_encode(mp, dtype, rank, ptr, dims, strides, box, elem, il, sw, l2, oob):
        ctypes = __import__("ctypes")
        calls.append((dtype, rank, ptr, list(ctypes.cast(dims, ctypes.POINTER(ctypes.c_uint64))[:4]),
                      list(ctypes.cast(strides, ctypes.POINTER(ctypes.c_uint64))[:3]),
                      list(ctypes.cast(box, ctypes.POINTER(ctypes.c_uint32))[:4]), sw))
        ctypes.c_int64.from_address(mp).value = ptr  # a recognisable first word
        return 0
    monkeypatch.setattr(_tma, "_encoder", lambda: fake_encode)
    monkeypatch.setattr(_tma, "_cache", {})

    def td(S, ptr, H=3, D=128, B=1):
        return TensorDesc(ptr, (B, S, H, D), (S * H * D, H * D, D, 1), "bf16", 0)
    q, k0, k1, v1 = td(64, 4096), td(300, 1 << 20), td(17, 2 << 20), td(17, 3 << 20)
    launch = flash.AttnLaunch([q], [k0, k1], [k0, v1], None, 1.0, out=[q], init=True,
                              finalize=True, impl="sm90ws")
    (p, *_), = launch._launches
    cfg = launch.kernel.cfg
    bn = cfg.ws_tiles()[0]
    assert cfg.tma and len(p) == cfg.param_slots == \
        flash._NSLOTS + (2 * _build.MAXKV + _build.MAXQ) * _tma.WORDS
    tk = lambda j: p[flash._NSLOTS + j * _tma.WORDS]  # noqa: E731
    tv = lambda j: p[flash._NSLOTS + (_build.MAXKV + j) * _tma.WORDS]  # noqa: E731
    tq = lambda j: p[flash._NSLOTS + (2 * _build.MAXKV + j) * _tma.WORDS]  # noqa: E731
    assert (tk(0), tk(1), tv(0), tv(1), tq(0)) == (1 << 20, 2 << 20, 1 << 20, 3 << 20, 4096)
    by_ptr = {c[2]: c for c in calls}
    assert len(by_ptr) == 4  # k0 is shared by K and V: encoded once (cache)
    assert by_ptr[4096][5] == [64, 128, 1, 1]  # Q: 128-row tiles
    # (Q tiles x heads, 1, batch), capped at one block per SM when persistent (the default)
    assert cfg.persistent and launch._launches[0][3] == (min(3, 132), 1, 1)
    cl2 = flash.AttnLaunch([q], [k0], [k0], None, 1.0, out=[q], init=True, finalize=True,
                           impl="sm90ws:CL=2").kernel.cfg
    assert cl2.cluster == 2 and not cl2.persistent
    dtype, rank, _, dims, strides, box, sw = by_ptr[2 << 20]
    assert (dtype, rank, sw) == (9, 4, 3)
    assert dims == [128, 17, 3, 1] and box == [64, bn, 1, 1]
    assert strides == [3 * 128 * 2, 128 * 2, 16]  # batch of size 1: nominal stride
    with pytest.raises(ValueError, match="multiples of 16"):
        _tma.box_geometry(TensorDesc(0, (2, 8, 3, 64), (8 * 3 * 64 + 4, 3 * 64, 64, 1), "bf16", 0), bn)


@pytest.mark.parametrize("D", [64, 128])
def test_fp8_launch_packs_byte_maps_and_side_arrays(fake_device, monkeypatch, D):
    """The FP8 kernel's parameters: int8 Q/K maps with D-byte rows (128- or 64-byte swizzle), the
    transposed V map (128 keys x D channels), then (pointer, batch, head stride) of every block's
    scales and key mean after the tensor maps; empty blocks dropped, side arrays follow them."""
    from sfattn.kernels import TensorDesc, _tma
    from sfattn.kernels.flash_fp8 import _SIDE0, Fp8Launch, fp8_tile
    from sfattn.quant import Fp8KV, Fp8Q
    calls = []

    def fake_encode(mp, dtype, rank, ptr, dims, strides, box, elem, il, sw, l2, oob):
        ctypes = __import__("ctypes")
        calls.append((ptr, dtype, list(ctypes.cast(dims, ctypes.POINTER(ctypes.c_uint64))[:4]),
                      list(ctypes.cast(strides, ctypes.POINTER(ctypes.c_uint64))[:3]),
                      list(ctypes.cast(box, ctypes.POINTER(ctypes.c_uint32))[:4]), sw))
        return 0
    monkeypatch.setattr(_tma, "_encoder", lambda: fake_encode)
    monkeypatch.setattr(_tma, "_cache", {})
    B, H = 2, 3

    def t(ptr, shape, dt):
        st, acc = [], 1
        for n in reversed(shape):
            st.append(acc)
            acc *= n
        return TensorDesc(ptr, tuple(shape), tuple(reversed(st)), dt, 0)

    def kv(ptr, S):
        sp = -(-S // 32) * 32
        return Fp8KV(t(ptr, (B, S, H, D), "int8"), t(ptr + 1 << 16, (B, H, -(-S // 128)), "fp32"),
                     t(ptr + 2 << 16, (B, H, D), "fp32"), t(ptr + 3 << 16, (B, H, D, sp), "e4m3"),
                     t(ptr + 4 << 16, (B, H), "fp32"))
    q = Fp8Q(t(1 << 24, (B, 300, H, D), "int8"), t(2 << 24, (B, H, 3), "fp32"))
    kvs = [kv(3 << 24, 1000), kv(4 << 24, 0), kv(5 << 24, 77)]
    out = t(6 << 24, (B, 300, H, D), "bf16")
    launch = Fp8Launch([q], kvs, None, 0.25, out=[out], init=True, finalize=True)
    (p, _argv, _argp, grid, *_), = launch._launches
    cfg = launch.kernel.cfg
    assert cfg.impl == "sm90fp8" and len(p) == cfg.param_slots == _SIDE0 + _build.SIDE_SLOTS
    assert grid == (-(-300 // cfg.block_m) * H, 1, B) and (p[0], p[1]) == (1, 2)
    side = lambda k, j: list(p[_SIDE0 + 3 * k * _build.MAXQ + 3 * j:][:3])  # noqa: E731
    assert side(0, 0) == [2 << 24, H * 3, 3]                     # Q scale
    assert side(1, 1) == [(5 << 24) + 1 << 16, H, 1]             # K scales of the third block
    assert side(2, 0) == [(3 << 24) + 2 << 16, H * D, D]         # mu
    assert side(3, 1) == [(5 << 24) + 4 << 16, H, 1]             # V scale
    by_ptr = {c[0]: c for c in calls}
    sw = 3 if D == 128 else 2
    assert by_ptr[1 << 24][1:] == (0, [D, 300, H, B], [H * D, D, 300 * H * D], [D, cfg.block_m, 1, 1], sw)
    # K boxes of BN rows; V^T in panels of 128 keys (128-byte swizzle), of 64 (64-byte) for 192-key tiles
    # (the default for blocks of 1000 and 77 keys: 128, as 192-key tiles would pad them by 17 %)
    for impl, bn in ((None, 128), ("sm90fp8:BN=128", 128), ("sm90fp8:BN=192", 192)):
        calls.clear()
        _tma._cache.clear()
        launch = Fp8Launch([q], kvs, None, 0.25, out=[out], impl=impl, init=True, finalize=True)
        assert launch.kernel.cfg.fp8_bn == bn == fp8_tile(kvs, impl)
        by_ptr = {c[0]: c for c in calls}
        assert by_ptr[3 << 24][1:] == (0, [D, 1000, H, B], [H * D, D, 1000 * H * D], [D, bn, 1, 1], sw)
        vp = 128 if bn == 128 else 64
        assert by_ptr[(5 << 24) + 3 << 16][1:] == (0, [96, D, H, B], [96, D * 96, H * D * 96], [vp, D, 1, 1],
                                                   3 if vp == 128 else 2)
    with pytest.raises(ValueError, match="BN"):
        Fp8Launch([q], kvs, None, 0.25, out=[out], impl="sm90fp8:BN=160", init=True, finalize=True)
    with pytest.raises(ValueError, match=r"kv_blocks\[0\].vt"):
        Fp8Launch([q], [Fp8KV(kvs[0].k, kvs[0].kscale, kvs[0].mu, t(9 << 24, (B, H, D, 992), "e4m3"),
                              kvs[0].vscale)], None, 0.25, out=[out], init=True, finalize=True)
    # precision='fp8-accurate': V as bf16 rows (the bf16 kernels' map: 64-channel boxes of BN rows),
    # the PV=16 build, no V scales
    calls.clear()
    kv16 = [Fp8KV(x.k, x.kscale, x.mu, None, None, v=t((7 << 24) + (i << 20), x.k.shape, "bf16"))
            for i, x in enumerate(kvs)]
    launch = Fp8Launch([q], kv16, None, 0.25, out=[out], init=True, finalize=True)
    (p, *_), = launch._launches
    assert dict(launch.kernel.cfg.opts).get("PV") == 16 and launch.pv16
    assert side(3, 1) == [0, 0, 0] and side(1, 1) == [(5 << 24) + 1 << 16, H, 1]
    by_ptr = {c[0]: c for c in calls}
    assert by_ptr[(7 << 24) + (2 << 20)][1:] == (9, [D, 77, H, B], [H * D * 2, D * 2, 77 * H * D * 2],
                                                  [64, launch.kernel.cfg.fp8_bn, 1, 1], 3)
    with pytest.raises(ValueError, match="not a mix"):
        Fp8Launch([q], [kv16[0], kvs[2]], None, 0.25, out=[out], init=True, finalize=True)
    with pytest.raises(TypeError, match="output's dtype"):
        Fp8Launch([q], [Fp8KV(x.k, x.kscale, x.mu, None, None, v=t(8 << 24, x.k.shape, "fp16")) for x in kvs[:1]],
                  None, 0.25, out=[out], init=True, finalize=True)
    # a kernel built for the other V than the blocks hold is refused, naming the impl
    with pytest.raises(ValueError, match="impl='sm90fp8:PV=16.*e4m3 V"):
        Fp8Launch([q], kvs, None, 0.25, out=[out], impl="sm90fp8:PV=16", init=True, finalize=True)
    with pytest.raises(ValueError, match="impl='sm90fp8:PV=8.*16-bit V"):
        Fp8Launch([q], kv16, None, 0.25, out=[out], impl="sm90fp8:PV=8", init=True, finalize=True)


def test_fp8_overlap_and_p_register_sets_defaults():
    """OV=1 (softmax overlapping the previous P.V) by default only for e4m3 P.V on 192-key tiles,
    where it goes with one P register set (two spill, as they do beside MI's seeded S); PP=0 only at head dim 64 with e4m3 P.V;
    every knob named by hand stays as named."""
    def cfg(d, **kn):
        return _build.KernelConfig("sm90fp8", d, "bf16", "sm_90a", 0, tuple(sorted(kn.items())))
    assert (cfg(128).fp8_ov, cfg(128).fp8_db) == (1, 0)  # 192-key tiles
    assert (cfg(128, BN=128).fp8_ov, cfg(128, BN=128).fp8_db) == (0, 1)
    assert (cfg(64).fp8_ov, cfg(64).fp8_db) == (0, 1)
    assert (cfg(128, PV=16).fp8_ov, cfg(128, PV=16).fp8_db) == (0, 0)
    assert (cfg(128, OV=0).fp8_ov, cfg(128, OV=0).fp8_db) == (0, 0)  # beside the seeded S (MI) two spill
    assert (cfg(128, OV=0, MI=0).fp8_ov, cfg(128, OV=0, MI=0).fp8_db) == (0, 1)
    assert (cfg(128, DB=1).fp8_ov, cfg(128, DB=1).fp8_db) == (1, 1)
    assert "-DWS_OV=1" in cfg(128).defines() and "-DWS_OV=0" in cfg(64).defines()
    # the consumers' ping-pong: off by default only at head dim 64 with e4m3 P.V
    assert (cfg(64).fp8_pp, cfg(128).fp8_pp, cfg(64, PV=16).fp8_pp, cfg(64, PP=1).fp8_pp) == (0, 1, 1, 1)
    assert "-DWS_PP=0" in cfg(64).defines() and "-DWS_PP=1" in cfg(128).defines()
    for d in (64, 128):  # the bf16 kernel keeps its own defaults (ping-pong on, OV off)
        ws = _build.KernelConfig("sm90ws", d, "bf16", "sm_90a").defines()
        assert "-DWS_PP=1" in ws and "-DWS_OV=0" in ws, ws
    # a block switch's q.mu: from Q and mu (default), loaded together (QL) or from a table (QP),
    # whose shared memory the launch reserves: 16 K/V blocks x the tile's rows of floats
    assert (cfg(128).fp8_ql, cfg(128).fp8_qp) == (0, 0)
    assert cfg(128, QP=1).smem_bytes - cfg(128).smem_bytes == 16 * 128 * 4
    assert cfg(64, QP=1).smem_bytes - cfg(64).smem_bytes == 16 * 192 * 4
    assert "-DF8_QP=1" in cfg(128, QP=1).defines() and "-DF8_QP=0" in cfg(128).defines()
    with pytest.raises(ValueError, match="QP and QL"):
        cfg(128, QP=1, QL=1).defines()


def test_heads_copy_refuses_unaligned_pieces_before_any_launch():
    from sfattn.kernels.flash import HeadsCopy

    ok = (0x1000, (4096, 512, 256), 0x2000, (8192, 512, 256))
    with pytest.raises(ValueError, match="pieces\\[1\\]: addresses"):
        HeadsCopy([ok, (0x1008, (4096, 512, 256), 0x2000, (8192, 512, 256))], 1, 4, 2, 256, 0)
    with pytest.raises(ValueError, match="row_bytes=72"):
        HeadsCopy([ok], 1, 4, 2, 72, 0)
    with pytest.raises(ValueError, match="pieces: expected 1..48"):
        HeadsCopy([ok] * 49, 1, 4, 2, 256, 0)


@needs_nvcc
def test_nvshmem_backend_device_code_compiles(tmp_path):
    """oneside's wait, barrier, delay and poison kernels (NVRTC-compiled at init on the GPU
    hosts) build for sm_90 here, so a typo shows before a GPU run."""
    import re
    from pathlib import Path

    import oneside.backends.nvshmem as nb

    src = Path(nb.__file__).read_text()
    code = re.search(r'_WAIT_KERNEL = r"""(.*?)"""', src, re.S).group(1)
    cu = tmp_path / "wait.cu"
    cu.write_text(code)
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "wait.cubin"), str(cu)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for fn in ("oneside_wait_next", "oneside_barrier_mapped", "oneside_wait", "oneside_poison"):
        assert fn in code
