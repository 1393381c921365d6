"""GPU tests of the FP8 attention kernel (sfattn/kernels/attn_sm90fp8.cu) against the float64
emulation of its contract (sfattn.quant.attention_fp8_emulated) and against exact attention.

Fresh random inputs per case, poisoned outputs and state, odd lengths, several Q and K/V blocks,
chained calls, both head dims, every knob the benchmark uses. Skipped without a Hopper GPU.
"""
import math

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) != (9, 0):
    pytest.skip("the FP8 kernel needs a Hopper GPU (sm_90)", allow_module_level=True)

from sfattn import kernels as K  # noqa: E402
from sfattn.kernels.flash_fp8 import Fp8Launch, attn_blocks_fp8, fp8_tile  # noqa: E402
from sfattn.quant import attention_fp8_emulated, quantize_kv, quantize_q  # noqa: E402

IMPLS = ["sm90fp8", "sm90fp8:PERSIST=1", "sm90fp8:KST=2,VST=2", "sm90fp8:NC=2,DB=0", "sm90fp8:PX=2",
         "sm90fp8:OV=1", "sm90fp8:OV=1,DB=0", "sm90fp8:PP=0",
         "sm90fp8:PP=1", "sm90fp8:LS=0", "sm90fp8:MI=0", "sm90fp8:RP=1", "sm90fp8:RP=1,MI=0",
         "sm90fp8:SX=1", "sm90fp8:SX=1,MI=0"]
# (impl, head dim): every knob at both head dims (default tiles: 128 keys at 64; at 128 192 keys,
# or 128 where 192 would pad the blocks, sfattn.kernels.flash_fp8.fp8_tile), and each tile length
# forced at 128 (at 64, longer tiles spill)
IMPL_DIMS = [(i, d) for i in IMPLS for d in (64, 128)] + \
    [("sm90fp8:BN=128", 128), ("sm90fp8:BN=192", 128), ("sm90fp8:BN=192,PERSIST=1", 128),
     ("sm90fp8:BN=128,OV=1", 128), ("sm90fp8:OV=0", 128), ("sm90fp8:OV=1,DB=1", 128),
     ("sm90fp8:BN=192,LS=0", 128)]


def _rounded_sum(impl, D):
    """Whether ``impl`` at head dim ``D`` sums P as rounded (knob LS, the default with e4m3 P.V): the
    emulation to compare with."""
    from sfattn.kernels import _build
    from sfattn.kernels.flash import _parse_impl
    base, bn, opts = _parse_impl(impl or "sm90fp8")
    return bool(_build.KernelConfig(base, D, "bf16", "sm_90a", bn, opts).fp8_ls)


def _g(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _rand(shape, g, scale=1.0):
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * scale


def _exact(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.double())


def _relerr(x, ref):
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double().cpu()
    ref = torch.as_tensor(ref).double().cpu()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("impl,D", IMPL_DIMS)
@pytest.mark.parametrize("qlens,kvlens", [([77, 300], [1000, 33, 259]), ([1], [1]), ([640], [128, 4099])])
def test_fp8_matches_its_emulation(impl, D, qlens, kvlens):
    g = _g(D + sum(qlens) + 7 * sum(kvlens))
    B, H = 2, 3
    S, N = sum(qlens), sum(kvlens)
    q, k, v = _rand((B, S, H, D), g), _rand((B, N, H, D), g), _rand((B, N, H, D), g)
    k = k + 3.0 * _rand((1, 1, H, D), g)                 # per-channel key bias (DiT keys)
    qs = [quantize_q(x) for x in q.split(qlens, dim=1)]
    kvs = [quantize_kv(a, b) for a, b in zip(k.split(kvlens, dim=1), v.split(kvlens, dim=1))]
    outs = [torch.full((B, n, H, D), float("nan"), device="cuda", dtype=torch.bfloat16) for n in qlens]
    scale = 1 / math.sqrt(D)
    lse = torch.full((B, H, S), float("nan"), device="cuda")
    Fp8Launch(qs, kvs, None, scale, out=outs, lse=lse, impl=impl, init=True, finalize=True)(
        init=True, finalize=True)
    torch.cuda.synchronize()
    o = torch.cat(outs, dim=1)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    emu = attention_fp8_emulated(qs, kvs, scale, tile=fp8_tile(kvs, impl),  # the kernel's tiles
                                 rounded_sum=_rounded_sum(impl, D))
    assert _relerr(o, emu) < 6e-3                          # bf16 output rounding ~2e-3
    assert _relerr(o, _exact(q, k, v, scale)) < 0.06
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    assert _relerr(lse, torch.logsumexp(s, dim=-1)) < 1e-2


@pytest.mark.parametrize("impl", ["sm90fp8:MI=0", "sm90fp8:RP=1", "sm90fp8:SX=1", "sm90fp8:SX=1,MI=0", "sm90fp8:MX=1",
                                  "sm90fp8:MX=1,MI=0", "sm90fp8:QV=0", "sm90fp8:QL=1", "sm90fp8:QP=1"])
@pytest.mark.parametrize("D", [64, 128])
def test_fp8_scheduling_knobs_are_bitwise_equal(impl, D):
    """MI=0 (S converted by an add after the GEMM, not seeded with the magic constant), RP (the rows' softmax pipelined), SX (the
    consumers' softmaxes taking turns), MX (S's maxima as integer maxima), QV=0 (q.mu with I2F), QL=1 (a block's constants
    loaded together) and QP=1 (q.mu of every block into a table at a Q tile's start) change only where instructions go:
    the same output and log-sum-exp bits as the default build, odd lengths and several blocks included."""
    flip = {"sm90fp8:MX=1": "sm90fp8:MX=0", "sm90fp8:MX=1,MI=0": "sm90fp8:MX=0,MI=0"}
    if D == 64:  # MX is on by default at head dim 64: test the other setting there
        impl = flip.get(impl, impl)
    g = _g(11 * D)
    B, H, qlens, kvlens = 2, 3, [77, 300], [1000, 33, 259]
    S, N = sum(qlens), sum(kvlens)
    q, k, v = _rand((B, S, H, D), g), _rand((B, N, H, D), g), _rand((B, N, H, D), g)
    qs = [quantize_q(x) for x in q.split(qlens, dim=1)]
    kvs = [quantize_kv(a, b) for a, b in zip(k.split(kvlens, dim=1), v.split(kvlens, dim=1))]
    res = []
    for im in (None, impl):
        outs = [torch.full((B, n, H, D), float("nan"), device="cuda", dtype=torch.bfloat16) for n in qlens]
        lse = torch.full((B, H, S), float("nan"), device="cuda")
        Fp8Launch(qs, kvs, None, 1 / math.sqrt(D), out=outs, lse=lse, impl=im, init=True, finalize=True)(
            init=True, finalize=True)
        torch.cuda.synchronize()
        res.append((torch.cat(outs, dim=1), lse))
    assert torch.isfinite(res[0][0]).all()
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("impl,D", [(None, 64), ("sm90fp8:BN=128", 128), ("sm90fp8:BN=192", 128),
                                    ("sm90fp8:LS=0", 64), ("sm90fp8:BN=192,LS=0", 128)])
def test_fp8_chained_calls_equal_one_call(impl, D):
    """Two launches through the fp32 state (the second finalizes) give the one-launch result when
    every block has the same V scale (then P is scaled identically in both) and the same tiles (by
    default the tile length follows each launch's blocks, fp8_tile, and P's rounding with it)."""
    g = _g(11 + D)
    B, H, S = 1, 4, 700
    lens = [300, 257, 511]
    q, k, v = _rand((B, S, H, D), g), _rand((B, sum(lens), H, D), g), _rand((B, sum(lens), H, D), g)
    for blk in v.split(lens, dim=1):
        blk[:, 0] = 8.0                                    # the same absmax in every block and head
    qs = [quantize_q(q)]
    kvs = [quantize_kv(a, b) for a, b in zip(k.split(lens, dim=1), v.split(lens, dim=1))]
    scale = 0.11
    one = torch.empty((B, S, H, D), device="cuda", dtype=torch.bfloat16)
    attn_blocks_fp8(qs, kvs, None, scale, init=True, finalize=True, out=[one], impl=impl)
    st = K.empty_state(B, S, H, D, like=q)
    st.acc.fill_(float("nan"))
    st.m.fill_(float("nan"))
    st.l.fill_(float("nan"))
    two = torch.full((B, S, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    attn_blocks_fp8(qs, kvs[:1], st, scale, init=True, impl=impl)
    attn_blocks_fp8(qs, kvs[1:], st, scale, finalize=True, out=[two], impl=impl)
    torch.cuda.synchronize()
    assert _relerr(two, one) < 6e-3
    assert _relerr(one, attention_fp8_emulated(qs, kvs, scale, tile=fp8_tile(kvs, impl),
                                               rounded_sum=_rounded_sum(impl, D))) < 6e-3


@pytest.mark.parametrize("kind", ["gauss", "outlier"])
def test_fp8_accuracy_on_the_benchmark_inputs(kind):
    """The contract's accuracy (docs/fp8.md): ~0.04 vs exact attention on Gaussian inputs and on
    keys with per-channel outliers alike (K smoothing)."""
    g = _g(5)
    B, S, H, D = 1, 2048, 4, 128
    q, k, v = (_rand((B, S, H, D), g) for _ in range(3))
    if kind == "outlier":
        k = k + 4.0 * _rand((1, 1, H, D), g)
    out = torch.empty((B, S, H, D), device="cuda", dtype=torch.bfloat16)
    attn_blocks_fp8([quantize_q(q)], [quantize_kv(k, v)], None, 1 / math.sqrt(D), init=True,
                    finalize=True, out=[out])
    err = _relerr(out, _exact(q, k, v, 1 / math.sqrt(D)))
    assert 0.02 < err < 0.05, err                          # below 0.02 would mean P or V not in e4m3


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 77, 300, 1029])
def test_fused_quantisers_match_the_torch_ones(D, S):
    """quant.cu against sfattn.quant's torch operations on strided bf16 views. Scales agree to the
    last bit or two (torch divides by a scalar through its reciprocal, the kernels divide; mu is
    summed in another order), so a value on a rounding boundary may land one step apart."""
    g = _g(S + D)
    B, H = 2, 3
    big = lambda: _rand((B, S + 3, H + 1, D + 8), g).to(torch.bfloat16)[:, 1:1 + S, :H, 8:]  # noqa: E731
    q, k, v = big(), big(), big()
    k = k + 3.0
    def close_steps(a, b):  # int8 or e4m3 codes: at most one step apart, rarely
        d = (a.view(torch.int8).int() - b.view(torch.int8).int()).abs()
        return d.max() <= 1 and d.float().mean() < 1e-2

    fq, tq = quantize_q(q), quantize_q(q, fused=False)
    assert torch.allclose(fq.scale, tq.scale, rtol=1e-6) and close_steps(fq.data, tq.data)
    fkv, tkv = quantize_kv(k, v), quantize_kv(k, v, fused=False)
    assert torch.allclose(fkv.mu, tkv.mu, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fkv.kscale, tkv.kscale, rtol=1e-5) and close_steps(fkv.k, tkv.k)
    assert torch.allclose(fkv.vscale, tkv.vscale, rtol=1e-6) and close_steps(fkv.vt, tkv.vt)
    assert fkv.vt.shape == tkv.vt.shape and fkv.vt.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("G", [1, 3])
def test_grouped_quantisation_equals_the_plain_one(G):
    """quantize_grouped (a layer's send buffers: heads in G groups, padded rows/keys) writes exactly
    what quantize_q / quantize_kv give for each group's heads, and nothing past them."""
    from sfattn.kernels.flash_fp8 import quantize_grouped

    g = _g(11 * G)
    B, S, H, D, Sl = 2, 300, 6, 128, 320
    q, k, v = (_rand((B, S, H, D), g).to(torch.bfloat16) for _ in range(3))
    k = k + 2.0
    Ht, nbl, slp = H // G, -(-Sl // 128), -(-Sl // 32) * 32
    mk = lambda shape, dt: torch.full(shape, 7, dtype=dt, device="cuda")  # noqa: E731  poison
    parts = {"q": mk((G, B, Sl, Ht, D), torch.int8), "k": mk((G, B, Sl, Ht, D), torch.int8),
             "qs": mk((G, B, Ht, nbl), torch.float32), "ks": mk((G, B, Ht, nbl), torch.float32),
             "mu": mk((G, B, Ht, D), torch.float32), "vt": mk((G, B, Ht, D, slp), torch.uint8),
             "vs": mk((G, B, Ht), torch.float32)}
    quantize_grouped(q, k, v, parts)
    fq, fkv = quantize_q(q), quantize_kv(k, v)
    nb, sp = -(-S // 128), -(-S // 32) * 32
    for i in range(G):
        hs = slice(i * Ht, (i + 1) * Ht)
        assert torch.equal(parts["q"][i, :, :S], fq.data[:, :, hs])
        assert torch.equal(parts["qs"][i, :, :, :nb], fq.scale[:, hs])
        assert torch.equal(parts["k"][i, :, :S], fkv.k[:, :, hs])
        assert torch.equal(parts["ks"][i, :, :, :nb], fkv.kscale[:, hs])
        assert torch.equal(parts["mu"][i], fkv.mu[:, hs])
        assert torch.equal(parts["vt"][i, ..., :sp], fkv.vt.view(torch.uint8)[:, hs])
        assert torch.equal(parts["vs"][i], fkv.vscale[:, hs])
    assert (parts["q"][:, :, S:] == 7).all() and (parts["qs"][..., nb:] == 7).all()
    assert (parts["vt"][..., sp:] == 7).all()
    # groups anywhere (as in mapped peers' buffers): one allocation per group, in reverse order
    from sfattn.kernels.flash_fp8 import GroupedDst

    apart = {n: [torch.full_like(t[0], 7) for _ in range(G)] for n, t in parts.items()}
    quantize_grouped(q, k, v, {n: GroupedDst([x.data_ptr() for x in ts], ts[0].stride()) for n, ts in apart.items()})
    for n, ts in apart.items():
        assert all(torch.equal(x, parts[n][i]) for i, x in enumerate(ts)), n
    with pytest.raises(ValueError, match=r"parts\['vt'\]"):
        quantize_grouped(q, k, v, {**parts, "vt": parts["vt"][..., :32]})
    # precision='fp8-accurate' (put exchange): V copied as it is into each group's slab
    p16 = {n: t for n, t in parts.items() if n not in ("vt", "vs")}
    p16["v"] = torch.full((G, B, Sl, Ht, D), 7.0, dtype=torch.bfloat16, device="cuda")
    quantize_grouped(q, k, v, p16)
    for i in range(G):
        assert torch.equal(p16["v"][i, :, :S], v[:, :, i * Ht:(i + 1) * Ht])
        assert torch.equal(p16["k"][i, :, :S], fkv.k[:, :, i * Ht:(i + 1) * Ht])
    assert (p16["v"][:, :, S:] == 7).all()


@pytest.mark.parametrize("impl,D", [(None, 64), (None, 128), ("sm90fp8:BN=128", 128), ("sm90fp8:BN=192", 128),
                                    ("sm90fp8:OV=1", 128)])
@pytest.mark.parametrize("qlens,kvlens", [([77, 300], [1000, 33, 259]), ([640], [128, 4099])])
def test_fp8_accurate_matches_its_emulation(impl, D, qlens, kvlens):
    """precision='fp8-accurate' (the PV=16 kernel: V in bf16, P.V a 16-bit wgmma): the emulation to
    the output's rounding, ~0.014 from exact attention, chained launches equal to one; the inputs in
    bf16, so K is quantised by the fused CUDA quantisers (pv='16': V used in place)."""
    g = _g(3 * D + sum(qlens) + sum(kvlens))
    B, H = 2, 3
    S, N = sum(qlens), sum(kvlens)
    q, k, v = (_rand(sh, g).to(torch.bfloat16) for sh in ((B, S, H, D), (B, N, H, D), (B, N, H, D)))
    k = k + (3.0 * _rand((1, 1, H, D), g)).to(torch.bfloat16)
    qs = [quantize_q(x) for x in q.split(qlens, dim=1)]
    kvs = [quantize_kv(a, b, pv="16") for a, b in zip(k.split(kvlens, dim=1), v.split(kvlens, dim=1))]
    assert all(kv.vt is None and kv.v is not None for kv in kvs)
    outs = [torch.full((B, n, H, D), float("nan"), device="cuda", dtype=torch.bfloat16) for n in qlens]
    scale = 1 / math.sqrt(D)
    Fp8Launch(qs, kvs, None, scale, out=outs, impl=impl, init=True, finalize=True)(init=True, finalize=True)
    torch.cuda.synchronize()
    o = torch.cat(outs, dim=1)
    assert torch.isfinite(o).all()
    assert _relerr(o, attention_fp8_emulated(qs, kvs, scale, tile=fp8_tile(kvs, impl))) < 6e-3
    assert _relerr(o, _exact(q, k, v, scale)) < 0.025
    st = K.empty_state(B, S, H, D, like=q)
    st.acc.fill_(float("nan"))
    two = [torch.full_like(x, float("nan")) for x in outs]
    attn_blocks_fp8(qs, kvs[:1], st, scale, init=True, impl=impl)
    attn_blocks_fp8(qs, kvs[1:], st, scale, finalize=True, out=two, impl=impl)
    torch.cuda.synchronize()
    assert _relerr(torch.cat(two, dim=1), o) < 6e-3
    with pytest.raises(ValueError, match="not a mix"):
        Fp8Launch(qs, [kvs[0], quantize_kv(k[:, :9], v[:, :9])], None, scale, out=outs, init=True, finalize=True)
    with pytest.raises(TypeError, match="dtype"):
        Fp8Launch(qs, [quantize_kv(k, v.half(), pv="16")], None, scale, out=outs, init=True, finalize=True)


def test_fp8_bad_inputs_raise_clear_errors():
    g = _g(3)
    q = _rand((1, 256, 2, 128), g)
    qs, kv = quantize_q(q), quantize_kv(q, q)
    out = torch.empty((1, 256, 2, 128), device="cuda", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q_blocks"):
        Fp8Launch([q], [kv], None, 0.1, out=[out], init=True, finalize=True)
    with pytest.raises(ValueError, match="head_dim 96"):
        Fp8Launch([quantize_q(_rand((1, 64, 2, 96), g))], [quantize_kv(*(2 * [_rand((1, 64, 2, 96), g)]))],
                  None, 0.1, out=[torch.empty((1, 64, 2, 96), device="cuda", dtype=torch.bfloat16)],
                  init=True, finalize=True)
    short = type(kv)(kv.k, kv.kscale, kv.mu, kv.vt[..., :128], kv.vscale)
    with pytest.raises(ValueError, match=r"kv_blocks\[0\].vt"):
        Fp8Launch([qs], [short], None, 0.1, out=[out], init=True, finalize=True)
    bad_scale = type(qs)(qs.data, qs.scale[..., :1])
    with pytest.raises(ValueError, match=r"q_blocks\[0\].scale"):
        Fp8Launch([bad_scale], [kv], None, 0.1, out=[out], init=True, finalize=True)
    with pytest.raises(TypeError, match=r"out\[0\]"):
        Fp8Launch([qs], [kv], None, 0.1, out=[out.float()], init=True, finalize=True)
    with pytest.raises(ValueError, match="not the FP8 kernel"):
        Fp8Launch([qs], [kv], None, 0.1, out=[out], impl="sm90ws", init=True, finalize=True)
