"""The torch op on the host backend: torch tensors in, torch tensors out, opaque to torch.compile."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sfattn  # noqa: E402
from ranks import all_ok, run_ranks  # noqa: E402
from sfattn.reference import attention_ref  # noqa: E402


def _torch_op(rt, compile_it: bool):
    plan = sfattn.make_plan(rt.mesh, 8, 21, 16)
    layer = sfattn.SPAttention(rt, plan, 1, "float64", layout="bhsd")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 21, 8, 16, dtype=torch.float64, generator=g) for _ in range(3))
    ref, _ = attention_ref(q.numpy(), k.numpy(), v.numpy(), layer.scale)
    lo, L = rt.rank * layer.Sl, layer.shard_len()
    sh = [x[:, lo:lo + L].transpose(1, 2) for x in (q, k, v)]  # BHSD views, not contiguous
    o = sfattn.attention(*sh, layer)
    assert isinstance(o, torch.Tensor) and o.shape == (1, 8, L, 16)
    err = float(np.abs(o.transpose(1, 2).numpy() - ref[:, lo:lo + L]).max())
    same = True
    if compile_it:
        f = torch.compile(lambda a, b, c: sfattn.attention(a, b, c, layer) * 2, fullgraph=True)
        same = bool(torch.equal(f(*sh), 2 * o))
    sfattn.release(layer)
    layer.close()
    return err, same


def test_torch_op_matches_reference():
    for err, _ in all_ok(run_ranks(_torch_op, 4, machines=2, heap="8MiB", compile_it=False)):
        assert err < 1e-12


def test_torch_op_under_torch_compile_fullgraph():
    res = all_ok(run_ranks(_torch_op, 2, heap="8MiB", deadline=300, timeout=240, compile_it=True))
    assert all(same for _, same in res)


def _compiled_first(rt):
    """Layers first used inside a compiled function (never called eagerly), passed as arguments."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, 4, 16, dtype=torch.float64, generator=g) for _ in range(3))
    ref, _ = attention_ref(q.numpy(), k.numpy(), v.numpy(), 16 ** -0.5)
    lo = rt.rank * 8
    sh = [x[:, lo:lo + 8].contiguous() for x in (q, k, v)]
    layers = [sfattn.SPAttention(rt, sfattn.make_plan(rt.mesh, 4, 16, 16, a), 1, "float64") for a in ("ulysses", "ring")]
    f = torch.compile(lambda a, b, c, layer: sfattn.attention(a, b, c, layer) + 0, backend="aot_eager", fullgraph=True)
    errs = [float(np.abs(f(*sh, layer).numpy() - ref[:, lo:lo + 8]).max()) for layer in layers + layers[:1]]
    for layer in layers:
        sfattn.release(layer)
        layer.close()
    return errs


def test_torch_op_compiled_before_any_eager_call():
    # the op's layer registry must be filled before the graph runs, and each layer keep its own handle
    for errs in all_ok(run_ranks(_compiled_first, 2, heap="8MiB", deadline=300, timeout=240)):
        assert len(errs) == 3 and max(errs) < 1e-12, errs


def test_attention_rejects_non_layer():
    with pytest.raises(TypeError, match="layer: expected an sfattn.SPAttention"):
        sfattn.attention(torch.zeros(1), torch.zeros(1), torch.zeros(1), layer=None)


def _sdpa_calls(rt, algo):
    from sfattn.local import TorchAttention

    calls = []
    orig = TorchAttention._sdpa

    def counting(self, *a, **kw):
        calls.append(1)
        return orig(self, *a, **kw)
    TorchAttention._sdpa = counting
    try:
        plan = sfattn.make_plan(rt.mesh, 8, 32, 16, algo)
        layer = sfattn.SPAttention(rt, plan, 1, "float64", local="torch")
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 32, 8, 16, dtype=torch.float64, generator=g) for _ in range(3))
        ref, _ = attention_ref(q.numpy(), k.numpy(), v.numpy(), layer.scale)
        lo, L = rt.rank * layer.Sl, layer.shard_len()
        o = sfattn.attention(*(x[:, lo:lo + L] for x in (q, k, v)), layer)
        sfattn.release(layer)
        layer.close()
    finally:
        TorchAttention._sdpa = orig
    return len(calls), float(np.abs(o.numpy() - ref[:, lo:lo + L]).max())


def test_torch_local_path_joins_ulysses_blocks_into_one_sdpa_call():
    """4 ranks of Ulysses: the 4 received K/V (and Q) blocks lie back to back on the heap, so the
    whole local attention is one SDPA call (no per-block calls and merges)."""
    for calls, err in all_ok(run_ranks(_sdpa_calls, 4, heap="8MiB", algo="ulysses")):
        assert calls == 1 and err < 1e-12
    for calls, err in all_ok(run_ranks(_sdpa_calls, 2, heap="8MiB", algo="ring")):
        assert calls == 2 and err < 1e-12  # own K/V, then the peer's: chained through the state


def test_fa3_local_path_says_what_it_needs():
    """local='fa3' without FlashAttention-3 (or off Hopper) is a clear error, not an ImportError."""
    from sfattn.local import FA3Attention, fa3_forward
    if fa3_forward() is not None:
        pytest.skip("fa3_fwd imports here")
    with pytest.raises(ValueError, match="fa3_fwd"):
        FA3Attention("cpu", "bfloat16")
