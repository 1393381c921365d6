"""CPU tests of the float64 reference of the multi-block attention contract (sfattn.reference)."""
import numpy as np
import pytest

from sfattn.reference import AttnState, attention_ref, attn_blocks, merge

RTOL = 1e-10


def _rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def _strided(rng, B, S, H, D):
    """A [B, S, H, D] float64 view with non-trivial strides (inside a bigger buffer)."""
    big = rng.standard_normal((B + 1, S + 3, H + 2, 2 * D))
    return big[1:, 2:2 + S, 1:1 + H, 1:2 * D:2]


def _split(x, lens):
    out, r = [], 0
    for n in lens:
        out.append(x[:, r:r + n])
        r += n
    return out


@pytest.mark.parametrize("qlens,klens", [([5], [7]), ([3, 0, 9], [4, 0, 1, 6]), ([1], [1]),
                                         ([11, 2], [13])])
def test_blocks_match_full_attention(qlens, klens):
    rng = np.random.default_rng(sum(qlens) * 31 + sum(klens))
    B, H, D = 2, 3, 8
    q = _strided(rng, B, sum(qlens), H, D)
    k = _strided(rng, B, sum(klens), H, D)
    v = _strided(rng, B, sum(klens), H, D)
    scale = 0.3
    st = AttnState.empty(B, sum(qlens), H, D, dtype=np.float64)
    st.acc[...] = np.nan  # init=True must ignore the contents
    st.m[...] = np.nan
    st.l[...] = np.nan
    outs = [np.full(b.shape, np.nan) for b in _split(q, qlens)]
    lse = np.full((B, H, sum(qlens)), np.nan)
    attn_blocks(_split(q, qlens), _split(k, klens), _split(v, klens), st, scale, init=True,
                finalize=True, out=outs, lse=lse)
    o_ref, lse_ref = attention_ref(q, k, v, scale)
    assert _rel(np.concatenate(outs, axis=1), o_ref) < RTOL
    assert _rel(lse, lse_ref) < RTOL
    # the state is the unnormalised form of the same result
    assert _rel(st.acc / st.l.transpose(0, 2, 1)[..., None], o_ref) < RTOL
    assert _rel(st.m + np.log(st.l), lse_ref) < RTOL


def test_chaining_equals_one_call():
    rng = np.random.default_rng(1)
    B, H, D = 1, 2, 16
    qlens, klens = [6, 4], [3, 5, 8, 1]
    q = _strided(rng, B, 10, H, D)
    k = _strided(rng, B, 17, H, D)
    v = _strided(rng, B, 17, H, D)
    one = AttnState.empty(B, 10, H, D, dtype=np.float64)
    attn_blocks(_split(q, qlens), _split(k, klens), _split(v, klens), one, 0.25, init=True)
    two = AttnState.empty(B, 10, H, D, dtype=np.float64)
    kb, vb = _split(k, klens), _split(v, klens)
    attn_blocks(_split(q, qlens), kb[:1], vb[:1], two, 0.25, init=True)
    attn_blocks(_split(q, qlens), kb[1:3], vb[1:3], two, 0.25)
    outs = [np.empty(b.shape) for b in _split(q, qlens)]
    attn_blocks(_split(q, qlens), kb[3:], vb[3:], two, 0.25, finalize=True, out=outs)
    for name in ("acc", "m", "l"):
        assert _rel(getattr(two, name), getattr(one, name)) < RTOL
    assert _rel(np.concatenate(outs, axis=1), attention_ref(q, k, v, 0.25)[0]) < RTOL


def test_float32_state_and_dtype_out():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 9, 2, 4)).astype(np.float32) for _ in range(3))
    st = AttnState.empty(1, 9, 2, 4)
    assert st.acc.dtype == np.float32 and st.m.shape == (1, 2, 9)
    out = [np.empty_like(q)]
    attn_blocks([q], [k], [v], st, 0.5, init=True, finalize=True, out=out)
    assert out[0].dtype == np.float32
    assert _rel(out[0], attention_ref(q, k, v, 0.5)[0]) < 1e-6


def test_rows_without_keys_give_zero_and_neg_inf():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, 2, 8))
    k0 = np.empty((1, 0, 2, 8))
    st = AttnState.empty(1, 4, 2, 8, dtype=np.float64)
    out = [np.full(q.shape, np.nan)]
    lse = np.full((1, 2, 4), np.nan)
    attn_blocks([q], [k0, k0], [k0, k0], st, 1.0, init=True, finalize=True, out=out, lse=lse)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse))
    assert np.all(st.l == 0) and np.all(np.isneginf(st.m))
    attn_blocks([q], [], [], st, 1.0, finalize=True, out=out, lse=lse)  # no kv blocks at all
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse))


def test_state_none_plain_attention():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 5, 1, 8)) for _ in range(3))
    out = [np.empty_like(q)]
    attn_blocks([q], [k], [v], None, 0.1, init=True, finalize=True, out=out)
    assert _rel(out[0], attention_ref(q, k, v, 0.1)[0]) < RTOL
    with pytest.raises(ValueError, match="state"):
        attn_blocks([q], [k], [v], None, 0.1, init=True)


def test_merge_matches_full():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 7, 3, 8))
    k = rng.standard_normal((2, 12, 3, 8))
    v = rng.standard_normal((2, 12, 3, 8))
    o1, l1 = attention_ref(q, k[:, :5], v[:, :5], 0.4)
    o2, l2 = attention_ref(q, k[:, 5:], v[:, 5:], 0.4)
    o, lse = merge(o1, l1, o2, l2)
    o_ref, lse_ref = attention_ref(q, k, v, 0.4)
    assert _rel(o, o_ref) < RTOL and _rel(lse, lse_ref) < RTOL
    # an empty side (lse = -inf) is the identity; both empty gives 0 / -inf
    oe, le = attention_ref(q, k[:, :0], v[:, :0], 0.4)
    o, lse = merge(o1, l1, oe, le)
    assert _rel(o, o1) < RTOL and _rel(lse, l1) < RTOL
    o, lse = merge(oe, le, oe.copy(), le.copy())
    assert np.all(o == 0) and np.all(np.isneginf(lse)) and not np.isnan(o).any()
    # in place into the first operand
    merge(o1, l1, o2, l2, out=o1, lse_out=l1)
    assert _rel(o1, o_ref) < RTOL


def test_extreme_logits_no_nan():
    q = np.full((1, 3, 1, 4), 30.0)
    k = np.concatenate([np.full((1, 2, 1, 4), 30.0), np.full((1, 2, 1, 4), -30.0)], axis=1)
    v = np.arange(16, dtype=np.float64).reshape(1, 4, 1, 4)
    out = [np.empty_like(q)]
    lse = np.empty((1, 1, 3))
    st = AttnState.empty(1, 3, 1, 4, dtype=np.float64)
    attn_blocks([q], [k[:, 2:], k[:, :2]], [v[:, 2:], v[:, :2]], st, 1.0, init=True,
                finalize=True, out=out, lse=lse)
    o_ref, lse_ref = attention_ref(q, k, v, 1.0)
    assert np.isfinite(out[0]).all() and _rel(out[0], o_ref) < RTOL and _rel(lse, lse_ref) < RTOL


def test_bad_arguments_name_the_argument():
    q = np.zeros((1, 4, 2, 8))
    k = np.zeros((1, 5, 2, 8))
    st = AttnState.empty(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k_blocks and v_blocks"):
        attn_blocks([q], [k, k], [k], st, 1.0, init=True)
    with pytest.raises(ValueError, match=r"q_blocks\[0\]"):
        attn_blocks([q[0]], [k], [k], st, 1.0, init=True)
    with pytest.raises(ValueError, match=r"k_blocks\[0\]"):
        attn_blocks([q], [np.zeros((1, 5, 3, 8))], [k], st, 1.0, init=True)
    with pytest.raises(ValueError, match=r"v_blocks\[0\]"):
        attn_blocks([q], [k], [np.zeros((1, 6, 2, 8))], st, 1.0, init=True)
    with pytest.raises(ValueError, match="state.acc"):
        attn_blocks([q], [k], [k], AttnState.empty(1, 5, 2, 8), 1.0, init=True)
    with pytest.raises(ValueError, match=r"out\[0\]"):
        attn_blocks([q], [k], [k], st, 1.0, init=True, finalize=True, out=[np.zeros((1, 3, 2, 8))])
    with pytest.raises(ValueError, match="lse"):
        attn_blocks([q], [k], [k], st, 1.0, init=True, finalize=True, out=[q.copy()],
                    lse=np.zeros((1, 4, 2)))
    with pytest.raises(TypeError, match="q_blocks"):
        attn_blocks(q, [k], [k], st, 1.0, init=True)
