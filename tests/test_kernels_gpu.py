"""GPU tests of sfattn.kernels against a float64 reference (skipped without CuPy, torch or a GPU).

Fresh random inputs every case, poisoned outputs/state, odd lengths, strided views, several q and
kv blocks, chained calls, both dtypes, both head dims, both implementations available on the GPU.
"""
import math

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver / no device
    _NDEV = 0
if _NDEV == 0 or not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from sfattn import kernels as K  # noqa: E402
from sfattn import reference as R  # noqa: E402

CC = torch.cuda.get_device_capability(0)
IMPLS = ["fa2"] + (["sm90ws", "sm90ws128", "sm90ws:TMA=0", "sm90ws:PERSIST=0", "sm90ws:NC=3",
                     "sm90ws:NC=3,PERSIST=1", "sm90ws:EX2=0,RT=0", "sm90ws:NC=2",
                     "sm90ws:CL=2", "sm90ws:FO=0", "sm90ws:BN=176", "sm90ws:OV=1"] if CC == (9, 0) else [])
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = 1e-2


def _supported(impl, D):
    """Skip configurations a head dim does not have (CL=2 multicasts 64-column panels: D 128)."""
    if "CL=2" in impl and D != 128:
        pytest.skip("CL=2 is a head dim 128 configuration")


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dtype)


def _strided(B, S, H, D, dtype, g):
    """A [B, S, H, D] view inside a bigger buffer (padded seq and heads), 16-byte aligned rows."""
    big = _rand((B, S + 5, H + 3, D + 8), dtype, g)
    return big[:, 2:2 + S, 1:1 + H, 8:8 + D]


def ref_attn(q, k, v, scale):
    """float64 attention on the GPU (same math as sfattn.reference.attention_ref)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    if k.shape[1] == 0:
        B, S, H, _ = q.shape
        return torch.zeros_like(qd), torch.full((B, H, S), -math.inf, device=q.device,
                                                dtype=torch.float64)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), vd)
    return o, lse


def rel(a, b):
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def _split(x, lens):
    out, r = [], 0
    for n in lens:
        out.append(x[:, r:r + n])
        r += n
    return out


def _state(B, S, H, D):
    st = K.empty_state(B, S, H, D, like=torch.empty(1, device="cuda"))
    for a in (st.acc, st.m, st.l):
        a.fill_(float("nan"))  # init=True must ignore it
    return st


def test_reference_on_gpu_matches_cpu_reference():
    g = _gen(0)
    q, k, v = (_rand((1, 33, 2, 64), torch.float32, g) for _ in range(3))
    o, lse = ref_attn(q, k, v, 0.2)
    o2, lse2 = R.attention_ref(q.cpu().numpy(), k.cpu().numpy(), v.cpu().numpy(), 0.2)
    assert np.abs(o.cpu().numpy() - o2).max() < 1e-10 and np.abs(lse.cpu().numpy() - lse2).max() < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq,sk", [(1, 1), (77, 1000), (4099, 77), (1000, 4099)])
def test_single_block_pair(impl, dtype, D, sq, sk):
    _supported(impl, D)
    g = _gen(sq * 7 + sk + D)
    B, H = 2, 3
    q = _strided(B, sq, H, D, DT[dtype], g)
    k = _strided(B, sk, H, D, DT[dtype], g)
    v = _strided(B, sk, H, D, DT[dtype], g)
    scale = 1.0 / math.sqrt(D)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, sq), float("nan"), device="cuda")
    K.attn_blocks([q], [k], [v], None, scale, init=True, finalize=True, out=[out], lse=lse,
                  impl=impl)
    torch.cuda.synchronize()
    o_ref, lse_ref = ref_attn(q, k, v, scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel(out, o_ref) < TOL
    assert (lse.double() - lse_ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_many_blocks_chained_strided(impl, dtype, D):
    _supported(impl, D)
    g = _gen(D + len(dtype))
    B, H = 1, 4
    qlens = [77, 0, 300, 1, 129]
    klens = [5, 128, 0, 1000, 333, 64, 1]
    q = _strided(B, sum(qlens), H, D, DT[dtype], g)
    k = _strided(B, sum(klens), H, D, DT[dtype], g)
    v = _strided(B, sum(klens), H, D, DT[dtype], g)
    scale = 0.7 / math.sqrt(D)
    qb, kb, vb = _split(q, qlens), _split(k, klens), _split(v, klens)
    S = sum(qlens)
    # one call over every kv block
    st1 = _state(B, S, H, D)
    out1 = [torch.full_like(x, float("nan")) for x in qb]
    lse1 = torch.full((B, H, S), float("nan"), device="cuda")
    K.attn_blocks(qb, kb, vb, st1, scale, init=True, finalize=True, out=out1, lse=lse1, impl=impl)
    # the same kv blocks over three chained calls, on a side stream
    st2 = _state(B, S, H, D)
    out2 = [torch.full_like(x, float("nan")) for x in qb]
    lse2 = torch.full((B, H, S), float("nan"), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.attn_blocks(qb, kb[:2], vb[:2], st2, scale, init=True, impl=impl)
        K.attn_blocks(qb, kb[2:5], vb[2:5], st2, scale, impl=impl, stream=s)
        K.attn_blocks(qb, kb[5:], vb[5:], st2, scale, finalize=True, out=out2, lse=lse2,
                      impl=impl)
    torch.cuda.synchronize()
    o_ref, lse_ref = ref_attn(q, k, v, scale)
    for out, lse in ((out1, lse1), (out2, lse2)):
        o = torch.cat(out, dim=1)
        assert not torch.isnan(o).any() and not torch.isnan(lse).any()
        assert rel(o, o_ref) < TOL
        assert (lse.double() - lse_ref).abs().max().item() < 1e-3
    assert rel(torch.cat(out2, 1), torch.cat(out1, 1)) < TOL
    # the chained state is the state of the single call
    assert rel(st2.acc, st1.acc) < TOL and (st2.m - st1.m).abs().max().item() < 1e-3
    assert rel(st2.l, st1.l) < TOL
    # the state's own normalisation matches the reference
    o_st = st1.acc.double() / st1.l.double().transpose(1, 2)[..., None]
    assert rel(o_st, o_ref) < TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("order", ["rising", "falling", "steps"])
def test_row_max_moving_across_key_tiles(impl, D, order):
    """Logits whose row maximum rises tile after tile (rescale every few tiles, past the kernels'
    rescale threshold), falls (never rescaled after the first tile) or jumps in steps; chained
    over two calls so the carried max is the kernel's own."""
    _supported(impl, D)
    g = _gen(31 + D + len(order))
    B, H, sq, sk = 1, 2, 333, 3001
    u = torch.randn(D, generator=g, device="cuda")
    u = u / u.norm() * math.sqrt(D)  # |u|^2 = D: the logit of q ~ u against k ~ c u is ~ c sqrt(D)
    j = torch.arange(sk, device="cuda", dtype=torch.float32)
    c = {"rising": 3.0 * j / sk, "falling": 3.0 * (1 - j / sk),
         "steps": 0.7 * torch.div(j, 700, rounding_mode="floor")}[order]
    q = (_rand((B, sq, H, D), torch.float32, g, 0.5) + u).to(torch.bfloat16)
    k = (_rand((B, sk, H, D), torch.float32, g, 0.5) + c[None, :, None, None] * u).to(torch.bfloat16)
    v = _rand((B, sk, H, D), torch.bfloat16, g)
    scale = 1 / math.sqrt(D)
    st = _state(B, sq, H, D)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, sq), float("nan"), device="cuda")
    K.attn_blocks([q], [k[:, :1234]], [v[:, :1234]], st, scale, init=True, impl=impl)
    K.attn_blocks([q], [k[:, 1234:]], [v[:, 1234:]], st, scale, finalize=True, out=[out], lse=lse,
                  impl=impl)
    torch.cuda.synchronize()
    o_ref, lse_ref = ref_attn(q, k, v, scale)
    assert rel(out, o_ref) < TOL
    assert (lse.double() - lse_ref).abs().max().item() < 1e-3
    o_st = st.acc.double() / st.l.double().transpose(1, 2)[..., None]
    assert rel(o_st, o_ref) < TOL


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("impl", IMPLS)
def test_more_blocks_than_one_launch_holds(impl, D):
    _supported(impl, D)
    g = _gen(11)
    B, H = 1, 2
    qlens = [40] * 20
    klens = [50] * 19 + [3]
    q, k, v = (_rand((B, sum(n), H, D), torch.bfloat16, g) for n in (qlens, klens, klens))
    st = _state(B, sum(qlens), H, D)
    out = [torch.full_like(x, float("nan")) for x in _split(q, qlens)]
    K.attn_blocks(_split(q, qlens), _split(k, klens), _split(v, klens), st, 0.125, init=True,
                  finalize=True, out=out, impl=impl)
    torch.cuda.synchronize()
    assert rel(torch.cat(out, 1), ref_attn(q, k, v, 0.125)[0]) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_keys(impl):
    g = _gen(12)
    q = _rand((1, 70, 2, 128), torch.bfloat16, g)
    e = q[:, :0]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, 70), float("nan"), device="cuda")
    K.attn_blocks([q], [e, e], [e, e], None, 0.1, init=True, finalize=True, out=[out], lse=lse,
                  impl=impl)
    torch.cuda.synchronize()
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_cupy_arrays_fp16_and_merge():
    rs = cp.random.RandomState(5)
    B, H, D = 1, 2, 128
    q = rs.standard_normal((B, 200, H, D), dtype=cp.float32).astype(cp.float16)
    k = rs.standard_normal((B, 300, H, D), dtype=cp.float32).astype(cp.float16)
    v = rs.standard_normal((B, 300, H, D), dtype=cp.float32).astype(cp.float16)
    scale = 1 / math.sqrt(D)
    parts = []
    for sl in (slice(0, 120), slice(120, 300)):
        o = cp.full(q.shape, cp.nan, dtype=cp.float16)
        lse = cp.full((B, H, 200), cp.nan, dtype=cp.float32)
        K.attn_blocks([q], [k[:, sl]], [v[:, sl]], None, scale, init=True, finalize=True, out=[o],
                      lse=lse, stream=cp.cuda.get_current_stream())
        parts.append((o, lse))
    out, lse = K.merge(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    cp.cuda.get_current_stream().synchronize()
    o_ref, lse_ref = R.attention_ref(q.get(), k.get(), v.get(), scale)
    o = out.get().astype(np.float64)
    assert np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref) < TOL
    assert np.abs(lse.get() - lse_ref).max() < 1e-3
    # in place into the first operand, bf16 torch tensors
    qt, kt, vt = (torch.as_tensor(x, device="cuda").to(torch.bfloat16) for x in (q, k, v))
    o1, l1 = ref_attn(qt, kt[:, :100], vt[:, :100], scale)
    o2, l2 = ref_attn(qt, kt[:, 100:], vt[:, 100:], scale)
    a, la = o1.to(torch.bfloat16), l1.float()
    K.merge(a, la, o2.to(torch.bfloat16), l2.float(), out=a, lse_out=la)
    torch.cuda.synchronize()
    o_full, l_full = ref_attn(qt, kt, vt, scale)
    assert rel(a, o_full) < TOL and (la.double() - l_full).abs().max().item() < 1e-3


def test_bad_inputs_raise_clear_errors():
    q = torch.zeros((1, 8, 2, 96), device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        K.attn_blocks([q], [q], [q], None, 0.1, init=True, finalize=True, out=[q.clone()])
    q = torch.zeros((1, 8, 2, 64), device="cuda", dtype=torch.float32)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        K.attn_blocks([q], [q], [q], None, 0.1, init=True, finalize=True, out=[q.clone()])
    q = torch.zeros((1, 8, 2, 64), device="cuda", dtype=torch.bfloat16)
    kt = torch.zeros((1, 64, 2, 8), device="cuda", dtype=torch.bfloat16).transpose(1, 3)
    with pytest.raises(ValueError, match=r"k_blocks\[0\].*contiguous"):
        K.attn_blocks([q], [kt], [kt], None, 0.1, init=True, finalize=True, out=[q.clone()])
    with pytest.raises(TypeError, match=r"v_blocks\[0\].*dtype"):
        K.attn_blocks([q], [q], [q.half()], None, 0.1, init=True, finalize=True, out=[q.clone()])
    st = K.empty_state(1, 9, 2, 64, like=q)
    with pytest.raises(ValueError, match="state.acc"):
        K.attn_blocks([q], [q], [q], st, 0.1, init=True)
    with pytest.raises(ValueError, match="scale"):
        K.attn_blocks([q], [q], [q], None, -1.0, init=True, finalize=True, out=[q.clone()])


@pytest.mark.skipif(CC != (9, 0), reason="the persistent launch is a Hopper (TMA) variant")
@pytest.mark.parametrize("D", [64, 128])
def test_persistent_blocks_loop_over_tiles(D):
    """Far more (Q tile, head) work items than SMs, so each persistent block runs several tiles
    (ring and barrier phases carried across tiles): bitwise equal to one block per tile."""
    g = _gen(13 + D)
    B, H = 2, 16
    qlens, klens = [1000, 2055, 7], [900, 1, 2000]
    q = _strided(B, sum(qlens), H, D, torch.bfloat16, g)
    k, v = (_rand((B, sum(klens), H, D), torch.bfloat16, g) for _ in range(2))
    qb, kb, vb = _split(q, qlens), _split(k, klens), _split(v, klens)
    res = {}
    for impl in ("sm90ws:PERSIST=0", "sm90ws"):  # (NC=3, persistent: in the impl grid)
        st = _state(B, sum(qlens), H, D)
        out = [torch.full_like(x, float("nan")) for x in qb]
        lse = torch.full((B, H, sum(qlens)), float("nan"), device="cuda")
        K.attn_blocks(qb, kb[:1], vb[:1], st, 0.09, init=True, impl=impl)
        K.attn_blocks(qb, kb[1:], vb[1:], st, 0.09, finalize=True, out=out, lse=lse, impl=impl)
        torch.cuda.synchronize()
        res[impl] = (torch.cat(out, 1), lse)
    (o1, l1), (o2, l2) = res.values()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert rel(o2, ref_attn(q, k, v, 0.09)[0]) < TOL
    tiles = sum(-(-n // 128) for n in qlens) * H
    assert tiles > 3 * torch.cuda.get_device_properties(0).multi_processor_count // B


@pytest.mark.skipif(CC != (9, 0), reason="clusters with TMA multicast are a Hopper variant")
@pytest.mark.parametrize("qlens", [[1000, 2055, 7], [128], [129, 1, 640]])
def test_cluster_multicast_equals_single_blocks(qlens):
    """CL=2 (pairs of blocks sharing K/V tiles by multicast; odd Q-tile counts padded per head):
    bitwise equal to CL=1, chained over K/V blocks, batch 2."""
    g = _gen(17 + len(qlens))
    B, H, D = 2, 5, 128
    klens = [900, 1, 2000]
    q = _strided(B, sum(qlens), H, D, torch.bfloat16, g)
    k, v = (_rand((B, sum(klens), H, D), torch.bfloat16, g) for _ in range(2))
    qb, kb, vb = _split(q, qlens), _split(k, klens), _split(v, klens)
    res = {}
    for impl in ("sm90ws:CL=1", "sm90ws:CL=2"):
        st = _state(B, sum(qlens), H, D)
        out = [torch.full_like(x, float("nan")) for x in qb]
        lse = torch.full((B, H, sum(qlens)), float("nan"), device="cuda")
        K.attn_blocks(qb, kb[:1], vb[:1], st, 0.09, init=True, impl=impl)
        K.attn_blocks(qb, kb[1:], vb[1:], st, 0.09, finalize=True, out=out, lse=lse, impl=impl)
        torch.cuda.synchronize()
        res[impl] = (torch.cat(out, 1), lse, st.acc.clone())
    (o1, l1, a1), (o2, l2, a2) = res.values()
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(a1, a2)
    assert rel(o2, ref_attn(q, k, v, 0.09)[0]) < TOL


@pytest.mark.parametrize("B,L,H,D,G", [(2, 37, 12, 128, 3), (1, 1000, 24, 80, 2), (1, 1, 24, 256, 1),
                                       (3, 700, 8, 64, 2)])
def test_heads_copy_moves_strided_head_groups_and_poisons_on_failure(B, L, H, D, G):
    """The p2p exchange's copy kernel: head groups of a strided [B, L, H, D] view into
    contiguous [B, Lp, Hg, D] pieces and back; a non-zero failure word writes NaN instead (also
    into a poison-only piece's destination, which is untouched without a failure).
    Shapes: batch 1 and more, rows of a power-of-two number of 16-byte vectors and not (D 80),
    a token's vectors outnumbering a grid's threads (D 256, one row), several grid strides."""
    from sfattn.kernels.flash import HeadsCopy

    Lp = L + 3  # G groups of H / G heads; padded piece rows Lp
    Hg = H // G
    big = torch.randn(B, L + 5, H + 4, D, device="cuda", generator=_gen(1)).to(torch.bfloat16)
    x = big[:, 3:3 + L, 2:2 + H]  # strided view: odd row offset, 2 heads of padding each side
    pieces = torch.full((G, B, Lp, Hg, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    es = 2
    xs, ps = [s * es for s in x.stride()], [s * es for s in pieces[0].stride()]
    HeadsCopy([(x.data_ptr() + g * Hg * xs[2], xs[:3], pieces[g].data_ptr(), ps[:3]) for g in range(G)],
              B, L, Hg, D * es, 0)(torch.cuda.current_stream().cuda_stream)
    for g in range(G):
        assert torch.equal(pieces[g, :, :L], x[:, :, g * Hg:(g + 1) * Hg])
    assert torch.isnan(pieces[:, :, L:].float()).all()  # rows past L untouched
    back = torch.empty(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    bs = [s * es for s in back.stride()]
    flag = torch.zeros(1, device="cuda", dtype=torch.int64)
    pull = HeadsCopy([(pieces[g].data_ptr(), ps[:3], back.data_ptr() + g * Hg * bs[2], bs[:3]) for g in range(G)],
                     B, L, Hg, D * es, 0, flag=flag.data_ptr())
    pull(torch.cuda.current_stream().cuda_stream)
    assert torch.equal(back, x)
    # a poison-only piece (src 0: a result written in place) is left alone until a wait failed
    flag.zero_()
    back.copy_(x)
    pieces.fill_(0)
    pull = HeadsCopy([(0 if g == 0 else pieces[g].data_ptr(), ps[:3], back.data_ptr() + g * Hg * bs[2], bs[:3])
                      for g in range(G)], B, L, Hg, D * es, 0, flag=flag.data_ptr())
    pull(torch.cuda.current_stream().cuda_stream)
    assert torch.equal(back[:, :, :Hg], x[:, :, :Hg]) and not back[:, :, Hg:].any()
    flag.fill_(1)
    pull(torch.cuda.current_stream().cuda_stream)
    assert torch.isnan(back.float()).all()
    with pytest.raises(ValueError, match="multiples of 16"):
        HeadsCopy([(x.data_ptr() + 2, xs[:3], pieces[0].data_ptr(), ps[:3])], B, L, Hg, D * es, 0)
