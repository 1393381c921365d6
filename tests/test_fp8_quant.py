"""CPU tests of the FP8 operands (sfattn.quant): the quantisers' layouts and scales, and the float64
emulation of the FP8 kernel against exact attention."""
import math

import numpy as np
import pytest
import torch

from sfattn import fp8 as F
from sfattn.quant import BLOCK, V_PERM, attention_fp8_emulated, quantize_kv, quantize_q


def _exact(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.double()).numpy()


def test_v_perm_matches_the_fragment_layouts():
    """A column a of the k32 P fragment of thread t (a = 4t + i, +16) holds the S accumulator's
    key 2t + (i & 1) + 8 (i >> 1) (+16): the n8 chunks 2c, 2c+1 of its row."""
    assert sorted(V_PERM) == list(range(32))
    for t in range(4):
        for i in range(4):
            for half in (0, 16):
                assert V_PERM[half + 4 * t + i] == half + 2 * t + (i & 1) + 8 * (i >> 1)


def test_quantize_q_scales_per_head_and_128_rows():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 3, 64, generator=g)
    q[1, 130, 2, 5] = 50.0                                   # one block's outlier
    x = quantize_q(q)
    assert x.data.dtype == torch.int8 and x.scale.shape == (2, 3, 3) and x.scale.dtype == torch.float32
    assert x.data.abs().max() == 127
    assert math.isclose(float(x.scale[1, 2, 1]), 50.0 / 127, rel_tol=1e-6)
    assert float(x.scale[1, 2, 0]) < 5.0 / 127                # other blocks keep their resolution
    deq = x.data.float() * x.scale.transpose(1, 2).repeat_interleave(BLOCK, 1)[:, :300, :, None]
    assert (deq - q).abs().max() <= x.scale.max() / 2 + 1e-6
    z = quantize_q(torch.zeros(1, 5, 1, 64))
    assert (z.scale == 1).all() and (z.data == 0).all()


def test_quantize_kv_smooths_k_and_transposes_v_in_fragment_order():
    g = torch.Generator().manual_seed(1)
    B, S, H, D = 1, 77, 2, 128
    k = torch.randn(B, S, H, D, generator=g) + 10.0 * torch.randn(1, 1, H, D, generator=g)
    v = torch.randn(B, S, H, D, generator=g)
    kv = quantize_kv(k, v)
    assert kv.len == S and kv.vt.shape == (B, H, D, 96) and kv.vt.dtype == torch.float8_e4m3fn
    assert torch.allclose(kv.mu, k.mean(dim=1))
    # smoothing removes the bias: the K scale is set by the per-token signal (~4 sigma), not 10 x bias
    assert float(kv.kscale.max()) < 6.0 / 127
    vt = kv.vt.float() * kv.vscale[:, :, None, None]
    for key in (0, 5, 31, 32, 76):
        grp, a = divmod(key, 32)
        col = 32 * grp + int(np.argwhere(V_PERM == a)[0, 0])
        assert torch.allclose(vt[0, :, :, col], v[0, key], rtol=0.07, atol=kv.vscale.max() * 2 ** -6)
    key_of_col = torch.as_tensor([32 * (c // 32) + int(V_PERM[c % 32]) for c in range(96)])
    assert (kv.vt.float()[..., key_of_col >= S] == 0).all()   # padding keys are zero
    assert (kv.vt.float()[..., key_of_col < S] != 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="same shape"):
        quantize_kv(k, v[:, :5])
    with pytest.raises(TypeError, match="floating point"):
        quantize_q(torch.zeros(1, 4, 1, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="fused=True"):
        quantize_kv(k, v, fused=True)                          # CPU tensors: torch operations only


@pytest.mark.parametrize("kind", ["gauss", "outlier"])
def test_emulated_kernel_accuracy(kind):
    """The contract's error (docs/fp8.md) on the benchmark's generator, Q and K/V in two shards:
    ~0.039 for Gaussian keys and keys with per-channel outliers alike."""
    q, k, v = (torch.from_numpy(x) for x in F.fp8_inputs(kind, 1, 512, 2, 128, seed=3))
    qs = [quantize_q(q[:, :300]), quantize_q(q[:, 300:])]
    kvs = [quantize_kv(k[:, :300], v[:, :300]), quantize_kv(k[:, 300:], v[:, 300:])]
    err = F.relerr(attention_fp8_emulated(qs, kvs), _exact(q, k, v, 1 / math.sqrt(128)))
    assert 0.025 < err < 0.05, err


@pytest.mark.parametrize("kind", ["gauss", "outlier"])
def test_emulated_accurate_contract(kind):
    """precision='fp8-accurate' (``pv='16'``): V kept as it is (bf16 here), P rounded to bf16, Q and K
    as for 'fp8': ~0.014 from exact attention, under the issue's 0.02, outliers or not."""
    q, k, v = (torch.from_numpy(x).to(torch.bfloat16) for x in F.fp8_inputs(kind, 1, 512, 2, 128, seed=3))
    qs = [quantize_q(q[:, :300]), quantize_q(q[:, 300:])]
    kvs = [quantize_kv(k[:, :300], v[:, :300], pv="16"), quantize_kv(k[:, 300:], v[:, 300:], pv="16")]
    assert kvs[0].vt is None and kvs[0].vscale is None and kvs[0].v.data_ptr() == v.data_ptr()
    err = F.relerr(attention_fp8_emulated(qs, kvs), _exact(q, k, v, 1 / math.sqrt(128)))
    assert 0.005 < err < 0.02, err
    with pytest.raises(ValueError, match="pv="):
        quantize_kv(k, v, pv="8")
    with pytest.raises(ValueError, match="every K/V block"):   # one launch holds one kind of V
        attention_fp8_emulated(qs, [kvs[0], quantize_kv(k[:, 300:], v[:, 300:])])


def test_emulation_without_quantisation_error_is_exact_attention():
    """With Q = K = 0 every P is exactly 1 (448 after scaling: exact in e4m3) and V on the e4m3
    grid of its scale: the emulation then is exact attention (the mean of V)."""
    B, S, H, D = 1, 40, 1, 64
    q = torch.zeros(B, S, H, D)
    k = torch.zeros(B, S, H, D)
    grid = torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])   # x 448 / 4: exact in e4m3
    v = grid[torch.randint(0, 7, (B, S, H, D))]
    v[0, 0, 0, 0] = 4.0
    out = attention_fp8_emulated([quantize_q(q)], [quantize_kv(k, v)], 0.5)
    assert np.allclose(out, v.double().mean(dim=1, keepdim=True).expand(B, S, H, D).numpy(), atol=1e-12)


def test_emulation_sums_p_as_rounded_by_default():
    """Two keys, p = (1, 0.3): P is scaled by 448 and 448 * 0.3 = 134.4 rounds to 128 in e4m3. The
    default (the kernel sums P in its P.V GEMM) normalises by the rounded sum, 1 + 128/448;
    rounded_sum=False by the exact one, 1.3. Q one-hot and K's channel 0 quantise exactly (smoothing
    makes the two keys +-0.602, one int8 step each), V = 4 and -2 are exact e4m3 after its scale."""
    D = 64
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 2, 1, D)
    k[0, 1, 0, 0] = math.log(0.3)
    v = torch.zeros(1, 2, 1, D)
    v[0, 0, 0, :] = 4.0
    v[0, 1, 0, :] = -2.0
    qs, kvs = [quantize_q(q)], [quantize_kv(k, v)]
    r1 = 128 / 448                                           # e4m3(448 * 0.3) / 448
    rounded = attention_fp8_emulated(qs, kvs, 1.0)
    assert np.allclose(rounded, (4 - 2 * r1) / (1 + r1), rtol=1e-5)
    assert np.allclose(attention_fp8_emulated(qs, kvs, 1.0, rounded_sum=False), (4 - 2 * r1) / 1.3, rtol=1e-5)


def test_fp8_tile_follows_the_kernel():
    """The FP8 kernel's keys per tile for given K/V blocks (the emulation's ``tile``): 192 at head dim
    128 unless that pads the keys by more than 5 % over 128, 128 at 64 and at head dims the kernel
    does not take, the BN knob when given; the GPU launch picks the same (test_kernels_compile)."""
    from sfattn.kernels.flash_fp8 import fp8_tile

    def kvs(D, *lens):
        return [quantize_kv(torch.zeros(1, n, 1, D), torch.zeros(1, n, 1, D)) for n in lens]
    assert fp8_tile(kvs(128, 16384)) == 192                 # 86 tiles for 85.3: 0.8 % padding
    assert fp8_tile(kvs(128, 4608)) == fp8_tile(kvs(128, 2304, 2304)) == 192
    assert fp8_tile(kvs(128, 4096)) == fp8_tile(kvs(128, *[4096] * 4)) == 192   # 3 % padding
    assert fp8_tile(kvs(128, 1000)) == fp8_tile(kvs(128, 640)) == 128           # 12.5 %, 20 %
    assert fp8_tile(kvs(128, 1000, 33, 259)) == 128
    assert fp8_tile(kvs(128, 516, 515)) == 192
    assert fp8_tile(kvs(128, 4096), "sm90fp8:BN=192") == 192 and fp8_tile(kvs(128, 4608), "sm90fp8:BN=128") == 128
    assert fp8_tile(kvs(64, 4608)) == fp8_tile(kvs(16, 4608)) == fp8_tile([]) == 128
    with pytest.raises(ValueError, match="FP8 kernel"):
        fp8_tile(kvs(128, 10), "sm90ws")


def test_grouped_quantiser_copies_a_16bit_v_per_group(monkeypatch):
    """quantize_grouped with ``parts['v']`` (precision='fp8-accurate', the put exchange's send
    buffers): V copied as it is into each head group's slab, rows past S untouched, no V kernels;
    ``parts['v']=None`` leaves V to the caller. The CUDA kernels are stubbed (their output is checked
    on the GPU, tests/test_fp8_gpu.py); this is the Python around them."""
    from sfattn.kernels import flash_fp8 as F8

    launched = []
    monkeypatch.setattr(F8, "cuda_quantizable", lambda *xs: True)
    monkeypatch.setattr(F8, "_run", lambda name, x, *args: launched.append(name))
    B, S, H, D, G, Sl = 2, 5, 4, 8, 2, 7
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(torch.bfloat16) for _ in range(3))
    Ht = H // G
    parts = {"q": torch.zeros(G, B, Sl, Ht, D, dtype=torch.int8), "k": torch.zeros(G, B, Sl, Ht, D, dtype=torch.int8),
             "qs": torch.zeros(G, B, Ht, 1), "ks": torch.zeros(G, B, Ht, 1), "mu": torch.zeros(G, B, Ht, D),
             "v": torch.full((G, B, Sl, Ht, D), 7.0, dtype=torch.bfloat16)}
    F8.quantize_grouped(q, k, v, parts)
    for i in range(G):
        assert torch.equal(parts["v"][i, :, :S], v[:, :, i * Ht:(i + 1) * Ht])
    assert (parts["v"][:, :, S:] == 7).all()
    assert "sf_quant_i8" in launched and not {"sf_absmax_v", "sf_quant_vt"} & set(launched)
    launched.clear()
    before = parts["v"].clone()
    F8.quantize_grouped(2 * q, 2 * k, 2 * v, {**parts, "v": None})
    assert torch.equal(parts["v"], before) and "sf_quant_i8" in launched
    with pytest.raises(ValueError, match=r"parts\['v'\]"):
        F8.quantize_grouped(q, k, v, {**parts, "v": F8.GroupedDst.of(parts["v"])})
