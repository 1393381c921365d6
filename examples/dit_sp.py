"""Sequence-parallel DiT denoising under diffusers' context parallelism, sfattn vs its peers.

    # 2 GPUs: Flux (full width, 2 double + 4 single blocks) at 2048^2 in bf16, compiled, against
    # one GPU, yunchang's USP and diffusers' own Ulysses and Ring (cuDNN), same sharding
    python -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 2048 --compile
    # any resolution: 1040 x 1040 = 4225 image tokens, which do not divide by 2 or 3 ranks
    python -m oneside.launch -n 3 --backend nvshmem examples/dit_sp.py --model flux --size 1040
    # Wan 2.1 14B width (40 heads: not divisible by 3), 33 frames of 480 x 832
    python -m oneside.launch -n 3 --backend nvshmem examples/dit_sp.py --model wan --frames 33
    # correctness only: 2 ranks on ONE GPU (NVSHMEM allows it, NCCL does not: gloo, no peers)
    python -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 1040 --ranks-per-gpu 2
    # CPU, host backend: tiny models in float64 (what CI runs, through tests/test_dit_example.py)
    python -m oneside.launch -n 2 examples/dit_sp.py --model qwenimage --tiny

``--model``: every family of ``dit_models.FAMILIES`` (flux, flux2, qwenimage, wan, ltx), built
from its config with random weights (no download) at the published width and a reduced
depth. A flow-matching Euler loop runs ``--steps`` steps: whole on rank 0 alone (the 1-GPU
reference), then with ``transformer.enable_parallelism(ContextParallelConfig(...))`` over all
ranks - diffusers' hooks split the inputs and gather the output - with the attention on

* ``sfattn``: ``sfattn.integrations.diffusers.enable`` (the planner's algorithm over oneside);
* ``usp``: yunchang 0.6.4's ``LongContextAttention`` (Ulysses inside, ring across) on the same
  shards (equal shards only: yunchang cannot take uneven ones);
* ``diffusers-ulysses``, ``diffusers-ring``, ``diffusers-unified`` (4+ ranks): diffusers' own
  templated attention, with the backend it would use (cuDNN SDPA on GPUs, native on CPUs),
  where it can run: NCCL (one rank per GPU), or gloo with equal shards (Ulysses).

Rank 0 compares the first step's output and the final latents with the reference (relative max
error; bf16/fp16 must stay under 2e-2) and prints each median step time. ``--precision fp8`` (or
``fp8-accurate``) adds ``sfattn-fp8`` (sfattn with that FP8 precision, docs/fp8.md): its errors are
reported against the
reference and against sfattn's own final latents (``final_vs_sfattn``), and must stay under
FP8_TOLERANCE.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

import oneside
from sfattn.integrations import diffusers as sfd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_models import FAMILIES, Family  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}
USP_TOLERANCE_FLOAT64 = 1e-5  # yunchang accumulates attention outputs in float32
FP8_TOLERANCE = 0.25  # sfattn-fp8, relative max error (docs/e2e.md: what it measures)
PEERS = ("usp", "diffusers-ulysses", "diffusers-ring", "diffusers-unified")
TINY_SIZE = {"flux": 80, "flux2": 80, "qwenimage": 80, "wan": 80, "ltx": 160}  # 5 x 5 tokens


# -- the USP baseline ---------------------------------------------------------------------------
class USPAttention(sfd.ContextParallelAttention):
    """diffusers' CP hooks and sfattn's routing, with yunchang 0.6.4's ``LongContextAttention``
    (USP: Ulysses all-to-all inside, ring across, over torch.distributed) as the attention.

    ``ulysses_degree``: default the largest divisor of the world that divides ``heads``. Local
    attention: cuDNN SDPA on GPUs (flash SDPA when the ring degree is > 1: yunchang's cuDNN path
    returns no log-sum-exp), SDPA math on CPUs, where only pure Ulysses is possible.
    """

    def __init__(self, transformer: torch.nn.Module, rt: oneside.Runtime, heads: int,
                 ulysses_degree: int | None = None):
        import torch.distributed as dist
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.kernels import AttnType

        W = rt.world_size
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
        if (dist.get_world_size(), dist.get_rank()) != (W, rt.rank):
            raise RuntimeError(f"USPAttention: torch.distributed rank {dist.get_rank()} of {dist.get_world_size()} "
                               f"differs from oneside's {rt.rank} of {W}")
        set_seq_parallel_pg(self.U, self.R, rt.rank, W, use_ulysses_low=True)
        self.usp = LongContextAttention(ring_impl_type="basic", attn_type=self.attn_type)
        super().__init__(transformer, rt)

    def describe(self) -> str:
        return f"yunchang USP U{self.U}xR{self.R} {self.attn_type.value}"

    def _make_layer(self, key: tuple, shapes: int) -> None:
        lens = key[0]
        if len(set(lens)) != 1:
            raise ValueError(f"yunchang USP needs equal shards, diffusers made {list(lens)}")
        return None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Any) -> torch.Tensor:
        return self.usp(q, k, v)


# -- setup --------------------------------------------------------------------------------------
def init_distributed(rt: oneside.Runtime, init_method: str | None, nccl: bool) -> None:
    """torch.distributed over the same ranks (diffusers' CP hooks need it): NCCL with one rank
    per GPU, gloo on CPUs and when ranks share a GPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if init_method is None:
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("--dist-init not given and MASTER_ADDR unset (run under oneside.launch or torchrun)")
        port = os.environ.get("ONESIDE_DIST_PORT") or int(os.environ["MASTER_PORT"]) + 11  # oneside.launch's, or torchrun's + 11
        init_method = f"tcp://{os.environ['MASTER_ADDR']}:{port}"
    kw: dict[str, Any] = {}
    if nccl:
        kw["device_id"] = torch.device("cuda", rt.backend.device)
    sfd.diffusers_workarounds()
    dist.init_process_group("nccl" if nccl else "gloo", init_method=init_method, rank=rt.rank,
                            world_size=rt.world_size, **kw)


def cp_config(name: str, world: int, uneven: bool) -> Any:
    """The ContextParallelConfig of a run (an "anything" mode when the shards are uneven)."""
    from diffusers import ContextParallelConfig

    if name in ("sfattn", "sfattn-fp8", "usp", "diffusers-ulysses"):  # "anything": also heads that do not divide
        return ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven or name != "usp")
    if name == "diffusers-ring":
        return ContextParallelConfig(ring_degree=world, ring_anything=uneven)
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)


def peer_problem(name: str, a: argparse.Namespace, world: int, uneven: bool, gpu: bool, nccl: bool) -> str | None:
    """Why the peer ``name`` cannot run here (None: it can)."""
    if a.cuda_graph and not nccl:
        return "--cuda-graph: a CUDA graph cannot hold gloo's collectives (NCCL: one rank per GPU)"
    if name == "usp":
        import importlib.util

        if importlib.util.find_spec("yunchang") is None:
            return "yunchang is not installed (pip install yunchang==0.6.4)"
        heads = model_config(a)["num_attention_heads"]
        if not gpu and heads % world:
            return f"yunchang runs only pure Ulysses on CPUs, and {heads} heads do not divide by {world} ranks"
        return "yunchang needs equal shards" if uneven else None
    if gpu and not nccl:
        return "ranks share a GPU: diffusers' templated attention needs NCCL, one rank per GPU"
    if not gpu and (uneven or name != "diffusers-ulysses"):
        return ("gloo cannot all-gather uneven shards" if uneven else
                "diffusers' ring needs a log-sum-exp, which its native CPU backend does not give")
    if name == "diffusers-unified" and (world < 4 or world % 2):
        return "unified needs ring 2 x ulysses >= 2 (4+ ranks, even)"
    return None


# -- the runs -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(FAMILIES), default="flux")
    ap.add_argument("--tiny", action="store_true", help="tiny model in float64 (CPU, host backend)")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels (default 2048 for images, 480x832 video; tiny: 5 tokens)")
    ap.add_argument("--height", type=int, default=None, help="pixels (overrides --size)")
    ap.add_argument("--width", type=int, default=None, help="pixels (overrides --size)")
    ap.add_argument("--frames", type=int, default=None, help="video frames (wan: 4k+1, default 33; ltx: 8k+1)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; tiny: 7)")
    ap.add_argument("--text-pad", type=int, default=0,
                    help="trailing text tokens that are padding (masked: Qwen-Image, LTX)")
    ap.add_argument("--depth", type=int, default=None, help="transformer blocks (Flux-style: double; single = 2x)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the family's)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "float64"), default=None,
                    help="default: bfloat16, float64 with --tiny")
    ap.add_argument("--steps", type=int, default=4, help="timed denoising steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed model calls before them")
    ap.add_argument("--algorithm", default=None, help="sfattn algorithm (default: the planner's choice)")
    ap.add_argument("--local", choices=("kernel", "torch", "fa3"), default="kernel", help="sfattn local attention")
    ap.add_argument("--precision", choices=("fp8", "fp8-accurate"), default=None,
                    help="also run sfattn with this precision (sfattn-fp8): its final latents are compared with "
                         "sfattn's in the model's dtype as well as with the 1-GPU reference")
    ap.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS),
                    help="baselines beside sfattn (each skipped with a note where it cannot run)")
    ap.add_argument("--usp-ulysses", type=int, default=None, help="USP's Ulysses degree (default: the largest)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (dynamic=False)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode; reduce-overhead replays each step as CUDA graphs (sfattn inside)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture each run's forward once as a CUDA graph and replay it every step (GPUs; sfattn "
                         "inside the graph; with --compile: the compiled model's kernels)")
    ap.add_argument("--sdpa", choices=("cudnn", "default"), default="cudnn",
                    help="torch SDPA on GPUs outside sfattn (the 1-GPU run, cross-attention): cuDNN or torch's choice")
    ap.add_argument("--ranks-per-gpu", type=int, default=1,
                    help="ranks sharing one GPU (> 1: correctness only, gloo, no peers, no speed-up claims)")
    ap.add_argument("--heap", default=None, help="symmetric heap per rank (default: sized from the shapes)")
    ap.add_argument("--dist-init", default=None, help="torch.distributed init_method (default: MASTER_ADDR:PORT+11)")
    ap.add_argument("--json", default=None, help="rank 0 writes the results here")
    ap.add_argument("--summary", default=None,
                    help="docs/perf/summary.json-style file for e2e_flux4096_2gpu_speedup and e2e_flux4096_over_usp "
                         "(only written by a full-width Flux 4096^2 run on 2 GPUs)")
    a = ap.parse_args(argv)
    fam = FAMILIES[a.model]
    if a.heads is not None and a.heads < 1:
        ap.error(f"--heads {a.heads}: expected >= 1")
    for name in ("steps", "ranks_per_gpu"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected >= 1")
    if a.warmup < 0:
        ap.error(f"--warmup {a.warmup}: expected >= 0")
    size = a.size or (fam.px_per_token * 5 if a.tiny else 2048)
    a.height = a.height or (size if a.size or not fam.video or a.tiny else 480)
    a.width = a.width or (size if a.size or not fam.video or a.tiny else 832)
    a.frames = a.frames or (1 + 2 * fam.frames_per_token if fam.video else 1)
    a.text_len = a.text_len or (7 if a.tiny else 512)
    try:
        a.res = fam.res_from_pixels(a.height, a.width, a.frames, text=a.text_len, text_pad=a.text_pad)
    except ValueError as e:
        ap.error(f"--height/--width/--frames: {e}")
    if a.dtype is None:
        a.dtype = "float64" if a.tiny else "bfloat16"
    return a


def model_config(a: argparse.Namespace) -> dict[str, Any]:
    """The family's constructor arguments, with ``--heads`` applied."""
    cfg = FAMILIES[a.model].config(a.tiny, a.depth)
    if a.heads:
        cfg["num_attention_heads"] = a.heads
        if "cross_attention_dim" in cfg:  # LTX: the captions' K/V are inner_dim wide
            cfg["cross_attention_dim"] = a.heads * cfg["attention_head_dim"]
    return cfg


def heap_bytes(a: argparse.Namespace, world: int) -> int:
    """Symmetric heap per rank: sfattn's layers for the longest attention, output gathers, margin."""
    fam = FAMILIES[a.model]
    cfg = model_config(a)
    img, txt = fam.tokens(a.res)
    dtype = getattr(torch, a.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    out = 4 * img * max(cfg.get("in_channels", 64), cfg.get("out_channels") or 0) * 4 * item  # gather buffers
    return sfd.heap_size(cfg, img + txt, world, dtype=dtype) + out


def denoise(velocity: Callable[[torch.Tensor, float], torch.Tensor], latents: torch.Tensor, steps: int,
            warmup: int, sync: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Flow-matching Euler steps from sigma 1 to 0: (final latents, first velocity, seconds per step)."""
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
        trace(f"step {i + 1}: {1e3 * times[-1]:.2f} ms")
        first = v.clone() if first is None else first  # reduce-overhead's graphs reuse their outputs
    return latents, first, times


class GraphedForward:
    """``fam.forward(model, x, sigma, cond)`` as one CUDA graph (``--cuda-graph``): at the first
    call, ``warm`` eager calls on a side stream (they compile the model and build sfattn's layers),
    then one capture; every call copies the latents and the timestep into the graph's static
    inputs and replays it. sfattn's layers issue their kernels, waits and barriers into the
    caller's graph (their rounds and tags live on the GPU, so replays stay exact)."""

    def __init__(self, fam: Family, model: Callable, cond: dict[str, Any], warm: int = 2):
        self.fam, self.model, self.cond, self.warm = fam, model, cond, warm
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = self.fam.timestep(x, sigma)
        if self.graph is None:
            self.x, self.t = x.clone(), t.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(self.warm):
                    self.fam.call(self.model, self.x, self.t, self.cond)
                    trace(f"graph warm-up call {i + 1} issued")
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            trace("warm-up done; capturing")
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fam.call(self.model, self.x, self.t, self.cond)
            trace("captured")
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max())


def rel_norm(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||: unlike the max error, not stuck at one bf16 step of the largest value."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def run(rt: oneside.Runtime, a: argparse.Namespace) -> dict[str, Any]:
    """The runs on this rank; rank 0 returns the full results, the others a partial dict."""
    fam: Family = FAMILIES[a.model]
    gpu = rt.backend.is_gpu
    device = torch.device("cuda", rt.backend.device) if gpu else torch.device("cpu")
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    shared_gpu = gpu and (a.ranks_per_gpu > 1 or torch.cuda.device_count() < rt.world_size)
    nccl = gpu and not shared_gpu
    me, W = rt.rank, rt.world_size
    cfg = model_config(a)
    img, txt = fam.tokens(a.res)
    uneven = bool(img % W or txt % W)
    res: dict[str, Any] = dict(model=a.model, tiny=a.tiny, dtype=a.dtype, ranks=W, backend=rt.backend_name,
                               device=torch.cuda.get_device_name(device) if gpu else "cpu",
                               compile=(a.compile_backend + (f" {a.compile_mode}" if a.compile_mode else ""))
                               if a.compile else None, cuda_graph=a.cuda_graph, steps=a.steps,
                               shared_gpu=shared_gpu, height=a.height, width=a.width, frames=a.frames,
                               tokens=img, text_tokens=txt, heads=cfg["num_attention_heads"], uneven=uneven,
                               ms={}, rel_err={}, describe={}, notes=[])
    if a.cuda_graph and not gpu:
        raise ValueError("--cuda-graph: needs GPUs (the host backend runs on CPUs)")
    init_distributed(rt, a.dist_init, nccl)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():  # inference tensors throughout: no recompilation between steps
        cond = fam.inputs(cfg, a.res, dtype, device, g)
        latents = torch.randn(fam.latent_shape(cfg, a.res), generator=g, dtype=torch.float64).to(device, dtype)
    fullgraph = not fam.video  # diffusers' split hook on a block (Wan, LTX) looks its argument up with
    # inspect.signature, which dynamo cannot trace: a graph break there, with or without sfattn

    def compiled(m: torch.nn.Module) -> Callable:
        if not a.compile:
            return m
        torch._dynamo.reset()
        counters.clear()
        return torch.compile(m, backend=a.compile_backend, fullgraph=fullgraph, dynamic=False, mode=a.compile_mode)

    def velocity(m: Callable) -> Callable[[torch.Tensor, float], torch.Tensor]:
        if a.cuda_graph:
            return GraphedForward(fam, m, cond)
        if a.compile and a.compile_mode == "reduce-overhead":
            def step(x: torch.Tensor, sigma: float) -> torch.Tensor:
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new step of torch's graphs
                return fam.forward(m, x, sigma, cond)
            return step
        return lambda x, sigma: fam.forward(m, x, sigma, cond)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # every SDPA outside sfattn/USP (the 1-GPU run, cross-attention) on the same backend
    sdpa = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if gpu and a.sdpa == "cudnn" else nullcontext()
    ref = None
    with torch.inference_mode(), sdpa:
        if me == 0:  # the 1-GPU reference, whole, on rank 0 alone
            trace("run 1gpu")
            model = fam.build(cfg, dtype, device)
            final, first, times = denoise(velocity(compiled(model)), latents, a.steps, a.warmup, sync)
            ref = (final, first)
            res["ms"]["1gpu"] = 1e3 * statistics.median(times)
            if a.compile:
                res.setdefault("graphs", {})["1gpu"] = counters["stats"]["unique_graphs"]
            del model
            if gpu:
                torch.cuda.empty_cache()
        rt.barrier_all()
        rt.sync()
        fp8 = ["sfattn-fp8"] if a.precision else []
        for name in ("sfattn", *fp8, *a.peers):
            why = None if name in ("sfattn", "sfattn-fp8") else peer_problem(name, a, W, uneven, gpu, nccl)
            if why is not None:
                res["notes"].append(f"{name} skipped: {why}")
                continue
            trace(f"run {name}")
            model = fam.build(cfg, dtype, device)
            model.enable_parallelism(config=cp_config(name, W, uneven))
            inst = None
            if name in ("sfattn", "sfattn-fp8"):
                inst = sfd.enable(model, rt, algorithm=a.algorithm, local=a.local,
                                  precision=a.precision if name == "sfattn-fp8" else None)
            elif name == "usp":
                inst = USPAttention(model, rt, cfg["num_attention_heads"], a.usp_ulysses)
            else:
                model.set_attention_backend("_native_cudnn" if gpu else "native")
            final, first, times = denoise(velocity(compiled(model)), latents, a.steps, a.warmup, sync)
            res["ms"][name] = 1e3 * statistics.median(times)
            if a.compile:
                res.setdefault("graphs", {})[name] = counters["stats"]["unique_graphs"]
            res["describe"][name] = (f"sfattn {'; '.join(inst.plans()) or 'gathered K/V (masked attention)'}"
                                     if name in ("sfattn", "sfattn-fp8") else
                                     inst.describe() if name == "usp" else
                                     f"{name} ({'cuDNN' if gpu else 'native'} SDPA)")
            if me == 0:
                res["rel_err"][name] = {"first_step": rel_err(first, ref[1]), "final": rel_err(final, ref[0])}
                if name == "sfattn":
                    ours = final
                elif name == "sfattn-fp8":
                    res["rel_err"][name]["final_vs_sfattn"] = rel_err(final, ours)
                    res["rel_norm"] = {"sfattn_vs_1gpu": rel_norm(ours, ref[0]), "fp8_vs_1gpu": rel_norm(final, ref[0]),
                                       "fp8_vs_sfattn": rel_norm(final, ours)}
            if inst is not None:
                inst.close()
            del model
            rt.barrier_all()
    import torch.distributed as dist

    dist.destroy_process_group()
    if me != 0:
        return res
    for name in a.peers:
        if name in res["ms"]:
            res[f"over_{name}"] = res["ms"][name] / res["ms"]["sfattn"]
    res["speedup"] = res["ms"]["1gpu"] / res["ms"]["sfattn"]
    if "sfattn-fp8" in res["ms"]:
        res["fp8_over_sfattn"] = res["ms"]["sfattn"] / res["ms"]["sfattn-fp8"]
    bad = []
    for name, errs in res["rel_err"].items():
        tol = FP8_TOLERANCE if name == "sfattn-fp8" else \
            USP_TOLERANCE_FLOAT64 if (name != "sfattn" and dtype == torch.float64) else TOLERANCE[dtype]
        if max(errs.values()) > tol:
            bad.append(f"{name}: rel err {max(errs.values()):.3g} > {tol:g}")
    res["ok"], res["failures"] = not bad, bad
    return res


def report(a: argparse.Namespace, res: dict[str, Any]) -> str:
    """The human-readable table of rank 0's results."""
    size = f"{a.height}x{a.width}" + (f"x{a.frames}f" if FAMILIES[a.model].video else "")
    lines = [f"{a.model}{' tiny' if a.tiny else ''} {size}: {res['tokens']} image/video + {res['text_tokens']} text "
             f"tokens{' (uneven shards)' if res['uneven'] else ''}, {res['heads']} heads, {a.dtype}, "
             f"{res['ranks']} ranks ({res['backend']}, {res['device']}), compile={res['compile'] or 'off'}, "
             f"{'one CUDA graph per forward, ' if res.get('cuda_graph') else ''}"
             f"median of {a.steps} steps"]
    t1 = res["ms"]["1gpu"]
    lines.append(f"  {'1 rank (reference)':<28} {t1:10.2f} ms/step")
    for name, ms in res["ms"].items():
        if name == "1gpu":
            continue
        e = res["rel_err"][name]
        lines.append(f"  {name + ' on ' + str(res['ranks']) + ' ranks':<28} {ms:10.2f} ms/step  {t1 / ms:5.2f}x  "
                     f"rel err first step {e['first_step']:.2e}, final {e['final']:.2e}"
                     + (f" (vs sfattn's {e['final_vs_sfattn']:.2e}; norm-wise {res['rel_norm']['fp8_vs_sfattn']:.2e}, "
                        f"sfattn vs 1 rank {res['rel_norm']['sfattn_vs_1gpu']:.2e})" if "final_vs_sfattn" in e else "")
                     + f"  [{res['describe'][name]}]")
    for name in PEERS:
        if f"over_{name}" in res:
            lines.append(f"  sfattn over {name}: {res[f'over_{name}']:.3f}x")
    if res["shared_gpu"] or res["device"] == "cpu":
        lines.append("  (ranks share a GPU or run on CPUs: these times are no performance figures)")
    if "graphs" in res:
        lines.append(f"  compiled graphs per run: {res['graphs']}")
    lines += [f"  note: {n}" for n in res["notes"]] + [f"  FAILED {f}" for f in res["failures"]]
    return "\n".join(lines)


def write_summary(a: argparse.Namespace, res: dict[str, Any], path: str) -> str:
    """Summary keys from the runs that define them; says what it did. Full-width Flux 4096^2 on 2
    GPUs: e2e_flux4096_2gpu_speedup (and _over_usp); full-width Flux 1024^2, compiled, 2 ranks
    sharing one GPU: e2e_flux1024_2ranks_1gpu_over_1rank (same compute as 1 rank: our overhead);
    any GPU run with --precision fp8: e2e_fp8_final_relerr_vs_bf16, e2e_fp8_over_bf16 (with
    fp8-accurate: the same keys as e2e_fp8_accurate_*)."""
    full = a.model == "flux" and not a.tiny and a.depth is None and a.heads is None
    values: dict[str, Any] = {}
    why = []
    if not res["ok"]:
        why.append("outputs differ from 1 GPU")
    elif full and (a.height, a.width) == (4096, 4096) and res["ranks"] == 2 and res["device"] != "cpu" \
            and not res["shared_gpu"]:
        values["e2e_flux4096_2gpu_speedup"] = round(res["speedup"], 3)
        if "over_usp" in res:
            values["e2e_flux4096_over_usp"] = round(res["over_usp"], 3)
    elif full and (a.height, a.width) == (1024, 1024) and res["ranks"] == 2 and res["shared_gpu"] and a.compile:
        values["e2e_flux1024_2ranks_1gpu_over_1rank"] = round(res["ms"]["sfattn"] / res["ms"]["1gpu"], 4)
        values["e2e_flux1024_compile"] = (res.get("compile") or a.compile_backend) + \
            (", one CUDA graph per forward" if res.get("cuda_graph") else "")
    elif "sfattn-fp8" not in res["ms"]:
        why.append("not full-width Flux at 4096^2 on 2 GPUs, nor compiled at 1024^2 on 2 ranks sharing a GPU")
    if res["ok"] and "sfattn-fp8" in res["ms"] and res["device"] != "cpu" and not a.tiny:
        k = "e2e_fp8_" if a.precision == "fp8" else "e2e_fp8_accurate_"
        values[f"{k}final_relerr_vs_bf16"] = round(res["rel_norm"]["fp8_vs_sfattn"], 5)
        values[f"{k}over_bf16"] = round(res["fp8_over_sfattn"], 3)
        values[f"{k}setting"] = (f"{a.model} {a.height}x{a.width}, {res['ranks']} ranks"
                                 f"{' sharing one GPU' if res['shared_gpu'] else ''}, {a.steps} steps")
    elif "sfattn-fp8" in res["ms"] and not values:
        why.append("the FP8 keys come from GPU runs of a full-size model")
    if why or not values:
        return f"summary: not written ({'; '.join(why)})"
    sys.path.insert(0, str(ROOT / "perf"))
    from common import update_summary

    update_summary({**values, "e2e_card": res["device"]}, Path(path))
    return f"summary: {values} -> {path}"


def trace(msg: str) -> None:
    """A progress line on stderr (``DIT_SP_TRACE=1``): where a slow or stuck run is."""
    if os.environ.get("DIT_SP_TRACE"):
        print(f"[dit_sp rank {os.environ.get('RANK', '0')} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
              flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every thread's stack
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = None
    if a.ranks_per_gpu > 1:  # consecutive ranks share a GPU
        device = int(os.environ.get("ONESIDE_HOST_RANK", os.environ.get("LOCAL_RANK", "0"))) // a.ranks_per_gpu
    rt = oneside.init(heap_size=a.heap or heap_bytes(a, world), device=device,
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
