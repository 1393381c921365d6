"""Sequence-parallel Flux transformer steps with sfattn, checked against one process and timed.

    # GPUs (one rank per GPU), full-width Flux with 2 double + 4 single blocks at 2048^2:
    python -m oneside.launch -n 2 --backend nvshmem examples/flux_sp.py --size 2048 --double 2 --single 4
    # CPU smoke run on the host backend (tiny model, float64):
    python -m oneside.launch -n 2 examples/flux_sp.py --tiny

Builds ``FluxTransformer2DModel`` from its config with random weights (no download), runs
``--steps`` transformer calls (the denoising loop's model evaluations) on this rank's slice
of the image tokens with sfattn, gathers the output, and compares it with the same model run
whole on rank 0's device. Rank 0 prints the error and the median step latency of both.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import oneside
from sfattn.integrations.diffusers import SequenceParallel


def build(a, dtype, device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    if a.tiny:
        cfg = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                   guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    else:  # Flux.1 widths, reduced depth
        cfg = dict(patch_size=1, in_channels=64, num_layers=a.double, num_single_layers=a.single,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return FluxTransformer2DModel(**cfg).to(device=device, dtype=dtype).eval(), cfg


def inputs(cfg, a, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    side = 8 if a.tiny else a.size // 16  # 8x VAE downsampling, then 2x2 patches
    n_img, n_txt = side * side, (8 if a.tiny else 512)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                     indexing="ij"), -1).reshape(-1, 3)
    x = dict(hidden_states=torch.randn(1, n_img, cfg["in_channels"], generator=g),
             encoder_hidden_states=torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g),
             pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
             timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(n_txt, 3))
    if cfg["guidance_embeds"]:
        x["guidance"] = torch.tensor([3.5])
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and "ids" not in k else v.dtype)
            for k, v in x.items()}


def timed(fn, steps: int, sync) -> tuple[torch.Tensor, float]:
    out, times = None, []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny model in float64 (CPU smoke run)")
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--algorithm", default=None)
    a = ap.parse_args()
    rt = oneside.init(heap_size="16GiB" if not a.tiny else "64MiB")
    gpu = rt.backend.is_gpu
    device = torch.device("cuda", rt.backend.device) if gpu else torch.device("cpu")
    dtype = torch.float64 if a.tiny else torch.bfloat16
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    model, cfg = build(a, dtype, device)
    x = inputs(cfg, a, dtype, device)
    with torch.no_grad():
        ref, t1 = timed(lambda: model(**x).sample, a.steps, sync) if rt.rank == 0 else (None, 0.0)
        rt.barrier_all()
        rt.sync()
        sp = SequenceParallel(rt, algorithm=a.algorithm)
        sp.apply_flux(model)
        local = dict(x, hidden_states=sp.shard(x["hidden_states"]), img_ids=sp.shard(x["img_ids"], dim=0))
        out, tn = timed(lambda: sp.gather(model(**local).sample), a.steps, sync)
    if rt.rank == 0:
        err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
        plan = next(iter(sp._layers.values())).plan
        print(f"flux{'-tiny' if a.tiny else f' {a.size}^2'}: {x['hidden_states'].shape[1]} image + "
              f"{x['encoder_hidden_states'].shape[1]} text tokens, {cfg['num_layers']}+{cfg['num_single_layers']} "
              f"blocks, {str(dtype).replace('torch.', '')}, backend={rt.backend_name}")
        print(f"  sfattn {plan.algorithm} (T={plan.T} U={plan.U} R={plan.R}) on {rt.world_size} ranks: "
              f"rel err vs 1 rank {err:.2e}")
        print(f"  step: 1 rank {t1 * 1e3:.2f} ms, {rt.world_size} ranks {tn * 1e3:.2f} ms, speed-up {t1 / tn:.2f}x")
        if err > (2e-2 if dtype == torch.bfloat16 else 1e-9):
            raise SystemExit("flux_sp: the sequence-parallel output differs from one rank's")
    sp.close()
    oneside.finalize()


if __name__ == "__main__":
    main()
