"""Sequence-parallel Diffusion Transformer denoising (Flux, Wan) with sfattn, checked and timed.

    # 2 GPUs: Flux (full width, 2 double + 4 single blocks) at 4096^2 in bf16, compiled,
    # against one GPU and yunchang's USP; writes the two e2e keys of docs/perf/summary.json
    python -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 4096 --compile \\
        --summary docs/perf/summary.json
    # 2 GPUs: Wan (2.1-1.3B width, 4 blocks), 20 s of 480x832 video at 16 fps (126,360 tokens)
    python -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model wan --frames 321 --compile
    # correctness only: 2 ranks on ONE GPU (NVSHMEM allows it, NCCL does not: no USP, no speed-up)
    python -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 1024 --ranks-per-gpu 2
    # CPU, host backend: tiny models in float64 (what CI runs, through tests/test_diffusers.py)
    python -m oneside.launch -n 2 examples/dit_sp.py --model wan --tiny --usp

The transformer is built from its config with random weights (no download), at the real
width and a reduced depth. A flow-matching Euler loop runs ``--steps`` denoising steps three
ways: whole on rank 0 alone (the 1-GPU reference), sequence-parallel over all ranks with
sfattn, and (``--usp``, when yunchang imports) the same sharding with yunchang 0.6.4's
``LongContextAttention`` over torch.distributed (NCCL on GPUs, gloo on CPUs) in place of
sfattn. Rank 0 compares the first step's model output and the final latents with the
reference (relative max error; bf16 must stay under 2e-2) and prints each median step time.

Text tokens (Flux) are replicated; inside attention each rank adds its 1/world slice of them
to its image rows and the text outputs are all-gathered, for sfattn and USP alike (see
``sfattn.integrations.diffusers``). A Flux step shards the latents, runs the model and
all-gathers its output; a Wan step calls the model with the whole latents (hooks shard
before the first block and all-gather after the last).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

import oneside
from sfattn.integrations.diffusers import SequenceParallel

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}
USP_TOLERANCE_FLOAT64 = 1e-5  # yunchang accumulates attention outputs in float32

WAN_WIDTHS = {  # Wan 2.1 text-to-video widths (diffusers WanTransformer3DModel arguments)
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960),
    "14b": dict(num_attention_heads=40, ffn_dim=13824),
}


# -- models and inputs ----------------------------------------------------------------------
def model_config(a: argparse.Namespace) -> dict[str, Any]:
    """The diffusers constructor arguments of ``--model`` (full width or ``--tiny``)."""
    if a.model == "flux":
        if a.tiny:
            return dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                        guidance_embeds=False, axes_dims_rope=(4, 6, 6))
        return dict(patch_size=1, in_channels=64, num_layers=a.double, num_single_layers=a.single,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if a.tiny:
        return dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, num_layers=a.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, rope_max_seq_len=1024, **WAN_WIDTHS[a.wan_width])


def build(a: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The transformer with seeded random weights (identical on every rank), in eval mode.

    In half precision the modules diffusers keeps in float32 when loading (``_keep_in_fp32_modules``)
    stay float32 here too, as with ``from_pretrained(torch_dtype=...)``.
    """
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    cls = FluxTransformer2DModel if a.model == "flux" else WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**model_config(a)).eval()
    keep = (getattr(model, "_keep_in_fp32_modules", None) or []) if dtype in (torch.bfloat16, torch.float16) else []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not any(k in name.split(".") for k in keep):
            t.data = t.data.to(dtype)
    return model


def make_inputs(a: argparse.Namespace, cfg: dict, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Initial latents and the conditioning, seeded (identical on every rank)."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if a.model == "flux":
        side = 8 if a.tiny else a.size // 16  # 8x VAE downsampling, then 2x2 patches
        n_txt = 8 if a.tiny else a.text_len
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1).reshape(-1, 3)
        x = dict(latents=randn(1, side * side, cfg["in_channels"]),
                 encoder_hidden_states=randn(1, n_txt, cfg["joint_attention_dim"]),
                 pooled_projections=randn(1, cfg["pooled_projection_dim"]),
                 img_ids=ids.to(device=device, dtype=dtype), txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype))
        if cfg["guidance_embeds"]:
            x["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
        return x
    if a.tiny:
        return dict(latents=randn(1, 4, 3, 8, 8), encoder_hidden_states=randn(1, 8, 16))
    lf = (a.frames - 1) // 4 + 1  # Wan's VAE: 4x in time (first frame alone), 8x in space
    return dict(latents=randn(1, cfg["in_channels"], lf, a.height // 8, a.width // 8),
                encoder_hidden_states=randn(1, a.text_len, cfg["text_dim"]))


def tokens(a: argparse.Namespace, x: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(image/video tokens, text tokens) of the inputs."""
    lat, txt = x["latents"], x["encoder_hidden_states"].shape[1]
    if a.model == "flux":
        return lat.shape[1], txt
    return lat.shape[2] * (lat.shape[3] // 2) * (lat.shape[4] // 2), txt


def step_fn(a: argparse.Namespace, model: Callable, x: dict[str, torch.Tensor],
            sp: SequenceParallel | None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``velocity(latents, sigma)``: one model evaluation on the whole latents, the whole output back.

    Flux with ``sp``: the latents and their position ids are sharded here and the output
    all-gathered; Wan: ``sp.apply_wan``'s hooks do both inside the model.
    """
    lat = x["latents"]
    if a.model == "flux":
        cond = {k: v for k, v in x.items() if k not in ("latents", "img_ids")}
        ids = sp.shard(x["img_ids"], dim=0) if sp is not None else x["img_ids"]

        def flux(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.full((1,), sigma, device=lat.device, dtype=lat.dtype)
            h = sp.shard(latents) if sp is not None else latents
            out = model(hidden_states=h, img_ids=ids, timestep=t, **cond).sample
            return sp.gather(out) if sp is not None else out
        return flux

    def wan(latents: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((1,), sigma * 1000.0, device=lat.device, dtype=torch.float32)
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=x["encoder_hidden_states"]).sample
    return wan


def denoise(velocity: Callable[[torch.Tensor, float], torch.Tensor], latents: torch.Tensor, steps: int,
            warmup: int, sync: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Flow-matching Euler steps from sigma 1 to 0: (final latents, first velocity, seconds per step).

    ``warmup`` untimed model calls first (compilation, autotuning)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for _ in range(warmup):
        velocity(latents, sigmas[0])
    times, first = [], None
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        v = velocity(latents, sigmas[i])
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v
        sync()
        times.append(time.perf_counter() - t0)
        first = v if first is None else first
    return latents, first, times


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max())


# -- the USP baseline -------------------------------------------------------------------------
class USPBaseline(SequenceParallel):
    """yunchang 0.6.4's ``LongContextAttention`` (USP: Ulysses all-to-all inside, ring across)
    behind the same processors, hooks and text handling as sfattn, over torch.distributed.

    ``ulysses_degree``: default the largest divisor of the world that divides ``heads`` (all
    Ulysses when it can), ring degree = world / that. Local attention: cuDNN SDPA on GPUs
    (flash SDPA when the ring degree is > 1: yunchang's cuDNN path returns no log-sum-exp, so
    it cannot merge ring steps); SDPA math on CPUs, where only pure Ulysses is possible
    (yunchang's flash path calls a CUDA-only aten op, its math path has no log-sum-exp).
    """

    def __init__(self, rt: oneside.Runtime, heads: int, ulysses_degree: int | None = None):
        import torch.distributed as dist
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.kernels import AttnType

        super().__init__(rt)
        if not dist.is_initialized():
            raise RuntimeError("USPBaseline: torch.distributed is not initialised (see init_distributed)")
        W = rt.world_size
        if (dist.get_world_size(), dist.get_rank()) != (W, rt.rank):
            raise RuntimeError(f"USPBaseline: torch.distributed rank {dist.get_rank()} of {dist.get_world_size()} "
                               f"differs from oneside's {rt.rank} of {W}")
        if ulysses_degree is None:
            ulysses_degree = max(d for d in range(1, W + 1) if W % d == 0 and heads % d == 0)
        if ulysses_degree < 1 or W % ulysses_degree or heads % ulysses_degree:
            raise ValueError(f"ulysses_degree={ulysses_degree}: must divide the {W} ranks and the {heads} heads")
        self.U, self.R = ulysses_degree, W // ulysses_degree
        if rt.backend.is_gpu:
            self.attn_type = AttnType.TORCH_CUDNN if self.R == 1 else AttnType.TORCH_FLASH
        elif self.R == 1:
            self.attn_type = AttnType.TORCH_MATH
        else:
            raise ValueError(f"ulysses_degree={ulysses_degree}: yunchang 0.6.4 runs only pure Ulysses on CPUs "
                             f"(ring degree {self.R} needs its flash path, CUDA only)")
        set_seq_parallel_pg(self.U, self.R, rt.rank, W, use_ulysses_low=True)
        self.usp = LongContextAttention(ring_impl_type="basic", attn_type=self.attn_type)

    def describe(self) -> str:
        return f"yunchang USP U{self.U}xR{self.R} {self.attn_type.value}"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.usp(q, k, v)

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


def init_distributed(rt: oneside.Runtime, init_method: str | None) -> None:
    """torch.distributed over the same ranks: NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if init_method is None:
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("--dist-init not given and MASTER_ADDR unset (run under oneside.launch or torchrun)")
        init_method = f"tcp://{os.environ['MASTER_ADDR']}:{int(os.environ['MASTER_PORT']) + 11}"
    kw: dict[str, Any] = {}
    if rt.backend.is_gpu:
        kw["device_id"] = torch.device("cuda", rt.backend.device)
    dist.init_process_group("nccl" if rt.backend.is_gpu else "gloo", init_method=init_method, rank=rt.rank,
                            world_size=rt.world_size, **kw)


# -- the three runs -----------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("flux", "wan"), default="flux")
    ap.add_argument("--tiny", action="store_true", help="tiny model in float64 (CPU, host backend)")
    ap.add_argument("--size", type=int, default=2048, help="flux: image side in pixels (multiple of 16)")
    ap.add_argument("--double", type=int, default=2, help="flux: double-stream blocks")
    ap.add_argument("--single", type=int, default=4, help="flux: single-stream blocks")
    ap.add_argument("--wan-width", choices=tuple(WAN_WIDTHS), default="1.3b", help="wan: Wan 2.1 model width")
    ap.add_argument("--layers", type=int, default=4, help="wan: transformer blocks")
    ap.add_argument("--frames", type=int, default=321, help="wan: video frames (4k+1; 321 = 20 s at 16 fps)")
    ap.add_argument("--height", type=int, default=480, help="wan: video height (multiple of 16)")
    ap.add_argument("--width", type=int, default=832, help="wan: video width (multiple of 16)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "float64"), default=None,
                    help="default: bfloat16, float64 with --tiny")
    ap.add_argument("--steps", type=int, default=4, help="timed denoising steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed model calls before them")
    ap.add_argument("--algorithm", default=None, help="sfattn algorithm (default: the planner's choice)")
    ap.add_argument("--local", choices=("kernel", "torch"), default="kernel", help="sfattn local attention")
    ap.add_argument("--usp", action=argparse.BooleanOptionalAction, default=True,
                    help="also run yunchang's USP (skipped with a message when yunchang is missing)")
    ap.add_argument("--usp-ulysses", type=int, default=None, help="USP's Ulysses degree (default: the largest)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (fullgraph=True)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--sdpa", choices=("cudnn", "default"), default="cudnn",
                    help="torch SDPA on GPUs (the 1-GPU run, Wan's cross-attention): cuDNN (as USP's local "
                         "kernel) or torch's choice")
    ap.add_argument("--ranks-per-gpu", type=int, default=1,
                    help="ranks sharing one GPU (> 1: correctness only, no USP, no speed-up claims)")
    ap.add_argument("--heap", default=None, help="symmetric heap per rank (default: sized from the shapes)")
    ap.add_argument("--dist-init", default=None, help="torch.distributed init_method (default: MASTER_ADDR:PORT+11)")
    ap.add_argument("--json", default=None, help="rank 0 writes the results here")
    ap.add_argument("--summary", default=None,
                    help="docs/perf/summary.json-style file for e2e_flux4096_2gpu_speedup and e2e_flux4096_over_usp "
                         "(only written by a full-width Flux 4096^2 run on 2 GPUs)")
    a = ap.parse_args(argv)
    for name in ("steps", "ranks_per_gpu", "layers", "double", "text_len"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected >= 1")
    if a.warmup < 0:
        ap.error(f"--warmup {a.warmup}: expected >= 0")
    if a.single < 0:
        ap.error(f"--single {a.single}: expected >= 0")
    if a.size % 16:
        ap.error(f"--size {a.size}: must be a multiple of 16 (8x VAE, 2x2 patches)")
    if a.height % 16 or a.width % 16:
        ap.error(f"--height {a.height} / --width {a.width}: must be multiples of 16")
    if (a.frames - 1) % 4:
        ap.error(f"--frames {a.frames}: must be 4k+1 (Wan's VAE)")
    if a.dtype is None:
        a.dtype = "float64" if a.tiny else "bfloat16"
    return a


def heap_size(a: argparse.Namespace, world: int) -> int:
    """Bytes of symmetric heap a rank needs: sfattn's buffers for the joint sequence (an upper
    bound of ``SPAttention.heap_bytes``: 12 + 2 x ring degree shards), the gathers, a margin."""
    cfg = model_config(a)
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    item = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    if a.model == "flux":
        side = 8 if a.tiny else a.size // 16
        n_img, n_txt, out_ch = side * side, 8 if a.tiny else a.text_len, cfg["in_channels"]
        seq = n_img + n_txt
    else:
        lf, h, w = (3, 8, 8) if a.tiny else ((a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)
        n_img, n_txt, out_ch = lf * (h // 2) * (w // 2), 0, cfg["out_channels"] * 4
        seq = n_img
    shard = -(-seq // world) * heads * hd * item
    text = n_txt * heads * hd * item
    out = n_img * out_ch * item + (0 if a.model == "flux" else n_img * heads * hd * item)
    return (12 + 2 * world) * shard + 2 * (text + out) + (256 << 20 if not a.tiny else 16 << 20)


def run(rt: oneside.Runtime, a: argparse.Namespace) -> dict[str, Any]:
    """The three runs on this rank; rank 0 returns the full results, the others a partial dict."""
    gpu = rt.backend.is_gpu
    device = torch.device("cuda", rt.backend.device) if gpu else torch.device("cpu")
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    shared_gpu = gpu and (a.ranks_per_gpu > 1 or torch.cuda.device_count() < rt.world_size)
    me, W = rt.rank, rt.world_size
    cfg = model_config(a)
    heads = cfg["num_attention_heads"]
    res: dict[str, Any] = dict(model=a.model, tiny=a.tiny, dtype=a.dtype, ranks=W, backend=rt.backend_name,
                               device=torch.cuda.get_device_name(device) if gpu else "cpu",
                               compile=a.compile_backend if a.compile else None, steps=a.steps,
                               shared_gpu=shared_gpu, ms={}, rel_err={}, notes=[])
    if a.model == "flux":
        res.update(size=a.size, blocks=f"{cfg['num_layers']}+{cfg['num_single_layers']}")
    else:
        res.update(frames=a.frames, height=a.height, width=a.width, blocks=cfg["num_layers"],
                   width_preset="tiny" if a.tiny else a.wan_width)

    usp_why = None
    if a.usp:
        try:
            importlib.import_module("yunchang")
        except ImportError:
            usp_why = "yunchang is not installed (pip install yunchang==0.6.4)"
        if usp_why is None and shared_gpu:
            usp_why = "ranks share a GPU: NCCL allows one rank per GPU"
        if usp_why is None:
            init_distributed(rt, a.dist_init)
    else:
        usp_why = "--no-usp"

    model = build(a, dtype, device)
    with torch.inference_mode():  # inference tensors throughout: no recompilation between steps
        x = make_inputs(a, cfg, dtype, device)
    res["tokens"], res["text_tokens"] = tokens(a, x)

    def compiled(m: torch.nn.Module) -> Callable:
        if not a.compile:
            return m
        torch._dynamo.reset()
        counters.clear()
        return torch.compile(m, backend=a.compile_backend, fullgraph=True)

    def graphs(name: str) -> None:  # graphs compiled in a run: 1 = no break, no recompilation
        if a.compile:
            res.setdefault("graphs", {})[name] = counters["stats"]["unique_graphs"]

    from contextlib import nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # every SDPA outside sfattn/USP (the 1-GPU run, Wan's cross-attention) on the same backend
    sdpa = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if gpu and a.sdpa == "cudnn" else nullcontext()
    ref = None
    with torch.inference_mode(), sdpa:
        if me == 0:  # the 1-GPU reference, whole, on rank 0 alone
            final, first, times = denoise(step_fn(a, compiled(model), x, None), x["latents"], a.steps,
                                          a.warmup, sync)
            ref = (final, first)
            res["ms"]["1gpu"] = 1e3 * statistics.median(times)
            graphs("1gpu")
            if gpu:
                torch.cuda.empty_cache()
        rt.barrier_all()
        rt.sync()

        runs: list[tuple[str, Callable[[], SequenceParallel]]] = [
            ("sfattn", lambda: SequenceParallel(rt, algorithm=a.algorithm, local=a.local))]
        if usp_why is None:
            runs.append(("usp", lambda: USPBaseline(rt, heads, a.usp_ulysses)))
        else:
            res["notes"].append(f"USP skipped: {usp_why}")
        for name, make in runs:
            sp = make()
            if name == "sfattn":  # every rank must hold rank 0's weights
                sums = sp.gather(torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1, 1)
                                 .to(device), dim=0)
                if not torch.equal(sums, sums[:1].expand_as(sums)):
                    raise RuntimeError(f"the ranks built different weights: checksums {sums.flatten().tolist()}")
            hooks = sp.apply_wan(model) if a.model == "wan" else sp.apply_flux(model) or []
            final, first, times = denoise(step_fn(a, compiled(model), x, sp), x["latents"], a.steps, a.warmup, sync)
            res["ms"][name] = 1e3 * statistics.median(times)
            graphs(name)
            if name == "sfattn":
                plan = next(iter(sp._layers.values())).plan
                res["sfattn"] = f"sfattn {plan.algorithm} (T={plan.T} U={plan.U} R={plan.R}, {a.local})"
            else:
                res["usp"] = sp.describe()
            if me == 0:
                res["rel_err"][name] = {"first_step": rel_err(first, ref[1]), "final": rel_err(final, ref[0])}
            for h in hooks:
                h.remove()
            sp.close()
            rt.barrier_all()
    if usp_why is None:
        import torch.distributed as dist

        dist.destroy_process_group()
    if me != 0:
        return res
    if "usp" in res["ms"]:
        res["over_usp"] = res["ms"]["usp"] / res["ms"]["sfattn"]
    res["speedup"] = res["ms"]["1gpu"] / res["ms"]["sfattn"]
    bad = []
    for name, errs in res["rel_err"].items():
        tol = USP_TOLERANCE_FLOAT64 if (name == "usp" and dtype == torch.float64) else TOLERANCE[dtype]
        if max(errs.values()) > tol:
            bad.append(f"{name}: rel err {max(errs.values()):.3g} > {tol:g}")
    res["ok"], res["failures"] = not bad, bad
    return res


def report(a: argparse.Namespace, res: dict[str, Any]) -> str:
    """The human-readable table of rank 0's results."""
    what = (f"flux {'tiny' if a.tiny else f'{a.size}^2'}" if a.model == "flux"
            else f"wan-{res['width_preset']} {'tiny' if a.tiny else f'{a.frames} frames {a.height}x{a.width}'}")
    lines = [f"{what}: {res['tokens']} image/video + {res['text_tokens']} text tokens, {res['blocks']} blocks, "
             f"{a.dtype}, {res['ranks']} ranks ({res['backend']}, {res['device']}), "
             f"compile={res['compile'] or 'off'}, median of {a.steps} steps"]
    t1 = res["ms"]["1gpu"]
    lines.append(f"  {'1 rank (reference)':<44} {t1:10.2f} ms/step")
    for name in ("sfattn", "usp"):
        if name in res["ms"]:
            e = res["rel_err"][name]
            label = f"{res[name]} on {res['ranks']} ranks"
            lines.append(f"  {label:<44} "
                         f"{res['ms'][name]:10.2f} ms/step  {t1 / res['ms'][name]:5.2f}x  "
                         f"rel err first step {e['first_step']:.2e}, final {e['final']:.2e}")
    if "over_usp" in res:
        lines.append(f"  sfattn over USP: {res['over_usp']:.3f}x")
    if res["shared_gpu"] or res["device"] == "cpu":
        lines.append("  (ranks share a GPU or run on CPUs: these times are no performance figures)")
    if "graphs" in res:
        lines.append(f"  compiled graphs per run (1 = no graph break, no recompilation): {res['graphs']}")
    lines += [f"  note: {n}" for n in res["notes"]] + [f"  FAILED {f}" for f in res["failures"]]
    return "\n".join(lines)


def write_summary(a: argparse.Namespace, res: dict[str, Any], path: str) -> str:
    """The two e2e keys, for a full-width Flux 4096^2 run on 2 GPUs only; says what it did."""
    why = []
    if a.model != "flux" or a.tiny or a.size != 4096:
        why.append("not full-width Flux at 4096^2")
    if res["ranks"] != 2 or res["device"] == "cpu" or res["shared_gpu"]:
        why.append("not 2 ranks on 2 GPUs")
    if not res["ok"]:
        why.append("outputs differ from 1 GPU")
    if why:
        return f"summary: not written ({'; '.join(why)})"
    sys.path.insert(0, str(ROOT / "perf"))
    from common import update_summary

    values = {"e2e_flux4096_2gpu_speedup": round(res["speedup"], 3)}
    if "over_usp" in res:
        values["e2e_flux4096_over_usp"] = round(res["over_usp"], 3)
    update_summary(values, Path(path))
    return f"summary: {values} -> {path}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = None
    if a.ranks_per_gpu > 1:  # consecutive ranks share a GPU
        device = int(os.environ.get("ONESIDE_HOST_RANK", os.environ.get("LOCAL_RANK", "0"))) // a.ranks_per_gpu
    rt = oneside.init(heap_size=a.heap or heap_size(a, world), device=device,
                      timeout=float(os.environ.get("ONESIDE_TIMEOUT", 1800)))
    try:
        res = run(rt, a)
    except BaseException:
        oneside.finalize(failed=True)
        raise
    oneside.finalize()
    if rt.rank != 0:
        return 0
    print(report(a, res), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.summary:
        print(write_summary(a, res, a.summary))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
