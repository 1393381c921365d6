"""Layer benchmark: every sfattn algorithm's median latency on DiT attention shapes.

    python -m oneside.launch -n 2 [--machines 2] --backend nvshmem perf/bench_layer.py [--out DIR]

Shapes: Flux 3072^2 (36864 image + 512 text tokens), Flux 4096^2 (65536 + 512), both 24 heads
x 128; a CogVideoX-class 20 s 768x1360 video (41 latent frames x 4080 + 226 text tokens), 24
heads x 64; batch 1, bf16. Each algorithm the mesh allows is timed with CUDA events on the
current stream (3 warm-up calls, median of 10), next to single-GPU torch SDPA (cuDNN) on the
whole sequence, measured in the same run. Writes ``layer_<M>x<G>[_link<GBPS>_<US>][_rpg<K>].json``
(``_rpgK`` when K ranks share one GPU, e.g. ``-n 4 --machines 4`` on 2 GPUs: K = 2, so such a
result never passes for a run on real machines; ``meta.ranks_per_gpu`` says it too; ``_fp8`` with
``--precision fp8``: the layers quantise on the owning rank and move FP8 bytes, the FP8 kernel
computes; ``_fp8acc`` with ``--precision fp8-accurate``); then run ``perf/report_layer.py`` for the table and the summary keys.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oneside  # noqa: E402
from common import PRECISION_TAGS, median_ms  # noqa: E402
import sfattn  # noqa: E402
from sfattn.plan import PlanError  # noqa: E402

def ranks_per_gpu(world_size: int, gpus: int) -> int:
    """Ranks sharing the busiest GPU when ``world_size`` ranks go round-robin over ``gpus``."""
    return max(1, -(-world_size // gpus)) if gpus > 0 else 1


def result_name(mesh: str, link: str | None, rpg: int, precision: str = "bf16") -> str:
    """``layer_<mesh>[_link<GBPS>_<US>][_rpg<K>][_fp8|_fp8acc].json`` (the rpg tag only when K > 1)."""
    tag = f"_link{link.replace(',', '_')}" if link else ""
    return f"layer_{mesh}{tag}" + (f"_rpg{rpg}" if rpg > 1 else "") + PRECISION_TAGS[precision] + ".json"


SHAPES = {"flux3072": (36864 + 512, 24, 128), "flux4096": (65536 + 512, 24, 128),
          "video20s": (41 * 4080 + 226, 24, 64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "docs/perf"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--algos", default=",".join(sfattn.ALGORITHMS))
    ap.add_argument("--heap", default="24GiB", help="symmetric heap per rank")
    ap.add_argument("--precision", choices=tuple(PRECISION_TAGS), default="bf16",
                    help="fp8 / fp8-accurate: SPAttention(precision=...), bf16 inputs and outputs")
    args = ap.parse_args()
    rt = oneside.init(heap_size=args.heap, timeout=300)
    me = rt.rank
    dev = torch.device("cuda", rt.backend.device)
    mesh = f"{rt.mesh.machines}x{rt.mesh.gpus_per_machine}"
    link = os.environ.get("ONESIDE_EMULATE_LINK")
    rpg = ranks_per_gpu(rt.world_size, torch.cuda.device_count())
    results: dict[str, dict[str, float]] = {}
    emulated = None
    if link and rt.mesh.machines > 1:  # check the pacing: a 64 MiB put to the other machine
        buf = rt.alloc(64 << 20, "uint8")
        peer = (me + rt.mesh.gpus_per_machine) % rt.world_size
        emulated = (64 << 20) / (median_ms(lambda: rt.put(buf, buf, peer)) * 1e-3) / 1e9
        if me == 0:
            print(f"emulated link {link}: a 64 MiB put to rank {peer} runs at {emulated:.1f} GB/s", flush=True)
        rt.barrier_all()
        rt.sync()
        rt.free(buf)
    for name in args.shapes.split(","):
        S, H, D = SHAPES[name]
        row: dict[str, float] = {}
        if me == 0:  # the single-GPU baseline on the whole sequence
            from torch.nn.attention import SDPBackend, sdpa_kernel

            x = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["sdpa_1gpu_cudnn"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(x, x, x))
            del x
        rt.barrier_all()
        rt.sync()
        for algo in args.algos.split(","):
            try:
                plan = sfattn.make_plan(rt.mesh, H, S, D, algo)
            except PlanError:
                continue
            layer = sfattn.SPAttention(rt, plan, 1, "bfloat16",
                                       precision=None if args.precision == "bf16" else args.precision)
            L = layer.shard_len()
            q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
            ms = median_ms(lambda: sfattn.attention(q, k, v, layer))
            # every rank's time; report the slowest (the layer ends when the last rank is done)
            t = torch.tensor([ms], device=dev, dtype=torch.float64)
            tall = rt.alloc((rt.world_size,), "float64")
            rt.barrier_all()
            rt.put(tall[me:me + 1], t, 0)
            rt.barrier_all()
            rt.sync()
            if me == 0:
                row[algo] = float(tall.local.max())
                print(f"{mesh} {name:>9} {algo:>8}: {row[algo]:8.2f} ms  (T={plan.T} U={plan.U} R={plan.R})",
                      flush=True)
            rt.free(tall)
            sfattn.release(layer)
            layer.close()
            del q, k, v
        if me == 0:
            print(f"{mesh} {name:>9} {'sdpa 1gpu':>8}: {row['sdpa_1gpu_cudnn']:8.2f} ms", flush=True)
        results[name] = row
    if me == 0:
        meta = {"device": torch.cuda.get_device_name(dev), "mesh": mesh, "ranks": rt.world_size,
                "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
                "emulated_link": link, "emulated_put_GBps": emulated, "precision": args.precision,
                "gpus": torch.cuda.device_count(), "ranks_per_gpu": rpg, "torch": torch.__version__,
                "command": (f"ONESIDE_EMULATE_LINK={link} " if link else "")
                + f"python -m oneside.launch -n {rt.world_size} --machines {rt.mesh.machines} "
                  f"--backend nvshmem perf/bench_layer.py --shapes {args.shapes} --algos {args.algos} "
                  f"--precision {args.precision}"}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / result_name(mesh, link, rpg, args.precision)).write_text(json.dumps({"meta": meta, "ms": results}, indent=1))
    oneside.finalize()


if __name__ == "__main__":
    main()
