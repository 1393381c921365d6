"""The model zoo (examples/dit_models.py) and diffusers' own context parallelism on it, on CPUs.

Every family's tiny model runs in float64 in one process and under
``enable_parallelism(ContextParallelConfig(...))`` on 2 and 3 forked processes over
torch.distributed gloo; each rank's gathered output must equal the one-process output
(relative max error < 1e-9). Token counts (image/video and text) do not divide by the ranks
unless a test says otherwise, and the tiny models have 3 heads (Ulysses pads them at 2 ranks).

diffusers 0.42.1 needs three environment shims on a CPU-only machine (``_shims``), each shown
necessary by a strict xfail below: none of them changes what a CUDA/NCCL machine with
transformers installed would run.

* ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, 0 without an
  accelerator (ZeroDivisionError): the shim reports one device while it runs.
* The anything modes gather the output with ``dist.all_gather`` of per-rank tensors of
  different sizes, which NCCL accepts and gloo refuses: the shim pads to the largest rank,
  gathers, trims (what ``_all_gather_anything`` means).
* The split hook calls ``logger.warning_once``, a method that transformers monkey-patches onto
  ``logging.Logger`` when it is imported; without transformers Wan (whose 1-D timestep skips
  the 2-D ``timestep`` entry of its plan) raises AttributeError: the shim adds the method.

Genuine diffusers 0.42.1 failures are strict xfails with their causes (LTX-Video's text mask,
Qwen-Image's padded text mask at 3 ranks, ring attention on CPUs).
"""
from __future__ import annotations

import builtins
import functools
import logging
import re
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from dit_models import FAMILIES, Family, Res  # noqa: E402
from ranks import free_port, run_ranks  # noqa: E402

import torch.distributed as dist  # noqa: E402
from diffusers import ContextParallelConfig  # noqa: E402
from diffusers.hooks import context_parallel as cp_hooks  # noqa: E402

for _fam in FAMILIES.values():  # import the model classes once, before forking
    _fam.model_class()

DTYPE = torch.float64
TOL = 1e-9
HAS_TRANSFORMERS = "transformers" in sys.modules or __import__("importlib").util.find_spec("transformers") is not None


def uneven(fam: Family, **kw: int) -> Res:
    """Image 5x7 tokens (x3 frames for videos: 35 or 105), 7 text tokens: no count divides by 2 or 3."""
    return Res(height=5, width=7, frames=3 if fam.video else 1, text=7, **kw)


def even(fam: Family) -> Res:
    """Image 6x5 tokens (x3 frames), 6 text tokens: everything divides by 2 and 3."""
    return Res(height=6, width=5, frames=3 if fam.video else 1, text=6)


# -- one process --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_forward_any_shape(name):
    fam = FAMILIES[name]
    cfg = fam.config(tiny=True)
    assert cfg["num_attention_heads"] == 3
    model = fam.build(cfg, DTYPE)
    g = torch.Generator().manual_seed(0)
    shapes = [uneven(fam), Res(1, 1, text=1), Res(7, 5, frames=2 if fam.video else 1, text=3, batch=2)]
    if fam.text_mask:
        shapes.append(uneven(fam, text_pad=2))
    for res in shapes:
        cond = fam.inputs(cfg, res, DTYPE, "cpu", g)
        x = torch.randn(fam.latent_shape(cfg, res), generator=g, dtype=DTYPE)
        t0 = time.perf_counter()
        with torch.no_grad():
            v = fam.forward(model, x, 0.7, cond)
        assert time.perf_counter() - t0 < 1.0
        assert v.shape == x.shape and v.dtype == DTYPE and torch.isfinite(v).all(), res
        n_img, n_txt = fam.tokens(res)
        assert n_txt == res.text
        assert n_img == (x.shape[1] if x.dim() == 3 else x.shape[2] * x.shape[3] * x.shape[4] // 4)


def test_res_from_pixels():
    assert FAMILIES["flux"].res_from_pixels(1040, 1040, text=512) == Res(65, 65, text=512)
    assert FAMILIES["wan"].res_from_pixels(480, 832, frames=81) == Res(30, 52, 21)
    assert FAMILIES["ltx"].res_from_pixels(480, 704, frames=161) == Res(15, 22, 21)
    with pytest.raises(ValueError):
        FAMILIES["flux"].res_from_pixels(1000, 1024)
    with pytest.raises(ValueError):
        FAMILIES["wan"].res_from_pixels(480, 832, frames=80)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_width_on_meta(name):
    """The published widths build and run (shapes only, on the meta device) at large odd sizes."""
    fam = FAMILIES[name]
    cfg = fam.config(tiny=False)
    model = fam.build(cfg, torch.bfloat16, "meta")
    res = Res(30, 52, 21, text=512) if fam.video else Res(65, 65, text=512)  # 32760 / 4225 tokens
    cond = fam.inputs(cfg, res, torch.bfloat16, "meta")
    x = torch.empty(fam.latent_shape(cfg, res), device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        v = fam.forward(model, x, 0.5, cond)
    assert v.shape == x.shape


# -- ranks ----------------------------------------------------------------------------------
def _pad_gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """diffusers' ``_all_gather_anything`` on gloo: equal-size all_gather of padded shards, trimmed."""
    sizes = cp_hooks.gather_size_by_comm(tensor.shape[dim], group)
    pad = list(tensor.shape)
    pad[dim] = max(sizes) - tensor.shape[dim]
    padded = torch.cat([tensor.contiguous(), tensor.new_zeros(pad)], dim)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)


@contextmanager
def _shims(cpu_mesh: bool, gather: bool, warning_once: bool) -> Iterator[None]:
    """The CPU-only environment shims of the module docstring (in a forked rank only)."""
    count = torch.accelerator.device_count
    if cpu_mesh:
        torch.accelerator.device_count = lambda: max(1, count())
    if gather:
        cp_hooks._all_gather_anything = _pad_gather
    if warning_once and not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = functools.lru_cache(None)(lambda self, *a, **k: self.warning(*a, **k))
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _rank(rt, port: int, name: str, res: Res, cp: dict[str, Any], shims: dict[str, bool],
          backend: str | None, heads: int | None, no_mask: bool) -> dict[str, Any]:
    """One rank (``rt``: its host-backend runtime, used only for rank and world size)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rt.rank, world_size=rt.world_size,
                            timeout=timedelta(seconds=20))
    fam = FAMILIES[name]
    cfg = fam.config(tiny=True)
    if heads is not None:
        cfg["num_attention_heads"] = heads
        if name == "ltx":
            cfg["cross_attention_dim"] = heads * cfg["attention_head_dim"]
    model = fam.build(cfg, DTYPE)
    if backend is not None:
        model.set_attention_backend(backend)
    g = torch.Generator().manual_seed(1)
    cond = fam.inputs(cfg, res, DTYPE, "cpu", g)
    if no_mask:
        cond["encoder_attention_mask"] = None
    x = torch.randn(fam.latent_shape(cfg, res), generator=g, dtype=DTYPE)
    seen: list[int] = []  # tokens reaching proj_out: the local shard under CP (gathered after it)
    model.proj_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad(), _shims(**shims):
        ref = fam.forward(model, x, 0.5, cond)
        model.enable_parallelism(config=ContextParallelConfig(**cp))
        out = fam.forward(model, x, 0.5, cond)
    dist.barrier()
    dist.destroy_process_group()
    return dict(err=float((out - ref).abs().max() / ref.abs().max()), shape=tuple(out.shape), seen=seen)


def check(name: str, world: int, res: Res, cp: dict[str, Any], expect: str | None = None, *,
          shims: dict[str, bool] | None = None, backend: str | None = None, heads: int | None = None,
          no_mask: bool = False) -> None:
    """Run ``name`` under ``cp`` on ``world`` ranks; every rank's output must equal one process's.

    A rank's failure is re-raised as its builtin exception type (RuntimeError if none), but
    only when the failures' text matches the regex ``expect``: an unexpected failure raises
    AssertionError, which the strict xfails below do not accept.
    """
    shims = dict(dict(cpu_mesh=True, gather=True, warning_once=True), **(shims or {}))
    results = run_ranks(_rank, world, deadline=60.0, grace=2.0, port=free_port(), name=name, res=res, cp=cp,
                        shims=shims, backend=backend, heads=heads, no_mask=no_mask)
    bad = [(r, s, v) for r, (s, v) in enumerate(results) if s != "ok"]
    if bad:
        text = "\n".join(f"rank {r} {s}: " + (f"{v[0]}: {v[1]}\n{v[2]}" if s == "err" else f"exit {v}")
                         for r, s, v in bad)
        if expect is None or not re.search(expect, text):
            raise AssertionError(f"unexpected failure:\n{text}")
        first = next(v for _, s, v in bad if s == "err")
        exc = getattr(builtins, first[0], None)
        raise (exc if isinstance(exc, type) and issubclass(exc, Exception) else RuntimeError)(text)
    fam = FAMILIES[name]
    n_img = fam.tokens(res)[0]
    shards = [len(s) for s in torch.arange(n_img).tensor_split(world)]
    for r, (_, v) in enumerate(results):
        assert v["shape"] == fam.latent_shape(fam.config(tiny=True), res)
        assert v["seen"] == [n_img, shards[r]], v["seen"]  # whole in one process, sharded under CP
        if v["err"] >= TOL:
            msg = f"rank {r}: rel err {v['err']:.3g} >= {TOL}"
            if expect is not None and re.search(expect, msg):
                raise Mismatch(msg)
            raise AssertionError(f"unexpected failure: {msg}")


class Mismatch(AssertionError):
    """The expected numerical mismatch of a strict xfail (any other failure is a plain AssertionError)."""


def anything(world: int) -> dict[str, Any]:
    return dict(ulysses_degree=world, ulysses_anything=True)


LTX_MASK = ("diffusers 0.42.1 bug, any device: LTXVideoAttnProcessor expands encoder_attention_mask to all heads "
            "(prepare_attention_mask + view(B, heads, -1, S)) before dispatch_attention_fn, but the templated "
            "Ulysses attention gives each rank heads/N heads (padded in the anything mode) and only all-gathers "
            "the mask along the key axis, so SDPA cannot broadcast a (B, heads, 1, S_txt) mask against "
            "(B, heads/N, S, S_txt) scores. The LTX pipeline always passes the mask.")
LTX_MASK_RE = r"RuntimeError: (The size of tensor a|output with shape)"

def _mark(name: str, world: int) -> Any:
    if name == "ltx":
        return pytest.param(name, world, id=f"{name}-{world}",
                            marks=pytest.mark.xfail(raises=RuntimeError, strict=True, reason=LTX_MASK))
    return pytest.param(name, world, id=f"{name}-{world}")


@pytest.mark.parametrize("name,world", [_mark(n, w) for n in FAMILIES for w in (2, 3)])
def test_ulysses_anything_uneven_tokens(name, world):
    check(name, world, uneven(FAMILIES[name]), anything(world), LTX_MASK_RE if name == "ltx" else None)


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_anything_ltx_without_text_mask(world):
    """LTX-Video is right under Ulysses once its text mask is left out (None)."""
    check("ltx", world, uneven(FAMILIES["ltx"]), anything(world), no_mask=True)


QWEN_PAD = ("diffusers 0.42.1 bug, any device: TemplatedUlyssesAnythingAttention pads each rank's key mask to "
            "the largest local length, all-gathers, concatenates and keeps the first sum(lengths) entries, which "
            "is right only when the padding sits at the very end, i.e. when only the last rank is short. "
            "Qwen-Image's joint [text, image] mask at 3 ranks has local lengths 3+12, 2+12, 2+11 = 15, 14, 13: "
            "rank 1's padding lands mid-sequence, the mask shifts, padded text is attended and real tokens "
            "masked (rel err ~2e-3). At 2 ranks only the last rank is short and the result is exact.")


@pytest.mark.parametrize("world", [
    2, pytest.param(3, marks=pytest.mark.xfail(raises=Mismatch, strict=True, reason=QWEN_PAD))])
def test_ulysses_anything_qwenimage_padded_text(world):
    check("qwenimage", world, uneven(FAMILIES["qwenimage"], text_pad=2), anything(world), r"rel err")


@pytest.mark.parametrize("name,world,heads", [
    ("flux", 2, 4), ("flux", 3, None), ("flux2", 3, None), ("qwenimage", 3, None), ("wan", 2, 4),
    ("wan", 3, None), pytest.param("ltx", 3, None, marks=pytest.mark.xfail(
        raises=RuntimeError, strict=True, reason=LTX_MASK))])
def test_ulysses_equipartition(name, world, heads):
    """Plain Ulysses (tokens and heads divide by the ranks): no uneven gather, so no gather shim."""
    check(name, world, even(FAMILIES[name]), dict(ulysses_degree=world), LTX_MASK_RE if name == "ltx" else None,
          shims=dict(gather=False), heads=heads)


RING_NATIVE = ("diffusers 0.42.1 on CPUs: ring attention merges partial results by their log-sum-exp, so it calls "
               "the backend's forward op with return_lse=True; the 'native' backend (the only CP backend with a "
               "CPU kernel) raises 'Native attention does not support return_lse=True'.")
RING_FLASH = ("diffusers 0.42.1 on CPUs: the '_native_flash' backend returns the LSE but calls "
              "aten::_scaled_dot_product_flash_attention, which has no CPU kernel (only "
              "_scaled_dot_product_flash_attention_for_cpu exists).")


@pytest.mark.parametrize("world,mode,backend", [
    pytest.param(2, "anything", None, marks=pytest.mark.xfail(raises=ValueError, strict=True, reason=RING_NATIVE)),
    pytest.param(3, "anything", None, marks=pytest.mark.xfail(raises=ValueError, strict=True, reason=RING_NATIVE)),
    pytest.param(2, "even", None, marks=pytest.mark.xfail(raises=ValueError, strict=True, reason=RING_NATIVE)),
    pytest.param(2, "anything", "_native_flash",
                 marks=pytest.mark.xfail(raises=NotImplementedError, strict=True, reason=RING_FLASH)),
])
def test_ring_flux(world, mode, backend):
    fam = FAMILIES["flux"]
    if mode == "anything":
        res, cp = uneven(fam), dict(ring_degree=world, ring_anything=True)
    else:
        res, cp = even(fam), dict(ring_degree=world)
    check("flux", world, res, cp, r"return_lse=True|_scaled_dot_product_flash_attention' with arguments from the "
          r"'CPU' backend", backend=backend)


# -- the shims are needed ---------------------------------------------------------------------
@pytest.mark.xfail(raises=ZeroDivisionError, strict=True, reason=(
    "diffusers 0.42.1 on CPU-only machines: ModelMixin._resolve_parallel_config computes "
    "torch.device(device_type, rank % torch.accelerator.device_count()) and device_count() is 0 without an "
    "accelerator, so enable_parallelism raises before building the mesh."))
def test_stock_enable_parallelism_on_cpu():
    check("flux", 2, even(FAMILIES["flux"]), dict(ulysses_degree=2), r"ZeroDivisionError: integer modulo by zero",
          shims=dict(cpu_mesh=False, gather=False), heads=4)


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason=(
    "gloo: the anything modes gather the output (proj_out's ContextParallelOutput) with _all_gather_anything, "
    "i.e. dist.all_gather into tensors of the ranks' different sizes; ProcessGroupNCCL accepts uneven sizes, "
    "ProcessGroupGloo::allgather raises 'invalid tensor size'. (Attention itself is fine: gloo's "
    "all_to_all_single takes uneven splits, and the mask gather pads.)"))
def test_stock_uneven_gather_on_gloo():
    check("flux", 2, uneven(FAMILIES["flux"]), anything(2), r"ProcessGroupGloo::allgather: invalid tensor size",
          shims=dict(gather=False))


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers is importable and adds logging.Logger.warning_once")
@pytest.mark.xfail(raises=AttributeError, strict=True, reason=(
    "diffusers 0.42.1 without transformers: ContextParallelSplitHook._prepare_cp_input calls "
    "logger.warning_once when a planned input has other dims than expected (Wan's 1-D timestep against the "
    "plan's 2-D Wan 2.2 per-token timestep); diffusers' logger is a plain logging.Logger and the method only "
    "exists once transformers has monkey-patched it in."))
def test_stock_wan_without_transformers():
    check("wan", 2, uneven(FAMILIES["wan"]), anything(2), r"has no attribute 'warning_once'",
          shims=dict(warning_once=False))
