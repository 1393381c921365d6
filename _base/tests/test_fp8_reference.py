"""The FP8 attention contract's float64 reference (sfattn/fp8.py): rounding grids, blocks,
and the accuracy each choice of formats reaches on the benchmark's inputs."""
from __future__ import annotations

import numpy as np
import pytest

from sfattn.fp8 import _bf16, attention_fp8_ref, attention_fp8_unit_scale, blocks_of, e4m3, fp8_inputs, relerr
from sfattn.reference import attention_ref


def test_rounding_grids_equal_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000) * 10.0 ** rng.uniform(-6, 3, 200_000)
    x[:4] = [448.0, 464.0, -1000.0, 2.0 ** -9 * 0.5]  # the top, a tie above it, saturation, a subnormal tie
    ref = torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).double().numpy()
    assert np.array_equal(e4m3(x), ref)
    assert np.array_equal(_bf16(x), torch.from_numpy(x).to(torch.bfloat16).double().numpy())


def test_blocks_never_span_two_ranks():
    assert blocks_of([300, 5], 128) == [(0, 128), (128, 256), (256, 300), (300, 305)]
    assert blocks_of([256], 128) == [(0, 128), (128, 256)]


def test_same_block_boundaries_same_result():
    q, k, v = fp8_inputs("gauss", 1, 512, 2, 64, seed=1)
    one = attention_fp8_ref(q, k, v)
    split = attention_fp8_ref(q, k, v, lens=[128, 384])  # the same blocks
    other = attention_fp8_ref(q, k, v, lens=[100, 412])  # other blocks: other scales, other rounding
    assert np.array_equal(one, split)
    assert not np.array_equal(one, other) and relerr(other, one) < 0.1  # two roundings of ~0.05 each


@pytest.mark.parametrize("kind", ["gauss", "outlier"])
def test_accuracy_of_each_format_choice(kind):
    """On Gaussian inputs every e4m3 operand costs ~2.5-4 % by itself (3 mantissa bits: the
    output's relative error follows the operand's), so an all-e4m3 contract sits near 0.05;
    int8 Q/K and a bf16 P.V reach < 0.02. K smoothing removes the outlier channels' harm."""
    q, k, v = fp8_inputs(kind, 1, 512, 2, 128, seed=3)
    ref, _ = attention_ref(q, k, v, 1 / np.sqrt(128))
    err = {(qk, pv): relerr(attention_fp8_ref(q, k, v, qk=qk, pv=pv, lens=[250, 262]), ref)
           for qk in ("e4m3", "int8") for pv in ("e4m3", "bf16")}
    assert err[("int8", "bf16")] < 0.02, err
    assert 0.04 < err[("e4m3", "e4m3")] < 0.06, err
    assert err[("int8", "e4m3")] > 0.03 and err[("e4m3", "bf16")] > 0.03, err  # one e4m3 GEMM is enough to miss
    unsmoothed = relerr(attention_fp8_ref(q, k, v, smooth=False), ref)
    unit = relerr(attention_fp8_unit_scale(q, k, v), ref)
    if kind == "outlier":
        assert unsmoothed > 2 * err[("e4m3", "e4m3")] and unit > 2 * err[("e4m3", "e4m3")], (unsmoothed, unit)
    else:
        assert abs(unsmoothed - err[("e4m3", "e4m3")]) < 0.01


def test_bad_arguments():
    q, k, v = fp8_inputs("gauss", 1, 8, 1, 16)
    with pytest.raises(ValueError, match="qk='fp4'"):
        attention_fp8_ref(q, k, v, qk="fp4")
    with pytest.raises(ValueError, match="kind='uniform'"):
        fp8_inputs("uniform", 1, 8, 1, 16)
