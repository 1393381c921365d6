"""sfattn side by side with yunchang (xDiT's USP) and single-GPU SDPA, on the same GPUs, one job.

    python -m oneside.launch -n 2 --backend nvshmem perf/attention_vs_peers.py [--shapes flux3072,...] [--out DIR]

Shapes: Flux 1024^2 / 3072^2 / 4096^2 (24 heads x 128, 512 text tokens joined to the image
tokens) and CogVideoX-class 20 s / 40 s videos (24 heads x 64, 226 text tokens). For each:
torch SDPA (cuDNN) on one GPU over the whole sequence; yunchang 0.6.4 ``LongContextAttention``
(USP over NCCL) with its TORCH_CUDNN and TORCH_FLASH local kernels for every Ulysses x Ring
split of the ranks; every sfattn algorithm with its own kernel and with the torch (cuDNN)
local path. Every output is checked against the single-GPU result (relative error < 2e-2)
before timing; times are the slowest rank's median of 10 CUDA-event-timed calls after 3
warm-up calls. Writes ``peers.json``; ``perf/report_peers.py`` makes the table, the chart and
the summary keys. (First written without GPU time left in its session: its first run is
pending; see the issues' notes.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oneside  # noqa: E402
import sfattn  # noqa: E402
from common import median_ms  # noqa: E402
from sfattn.plan import PlanError  # noqa: E402

SHAPES = {"flux1024": (4096 + 512, 24, 128), "flux3072": (36864 + 512, 24, 128), "flux4096": (65536 + 512, 24, 128),
          "video20s": (41 * 4080 + 226, 24, 64), "video40s": (81 * 4080 + 226, 24, 64)}


def slowest(ms: float, dev) -> float:
    t = torch.tensor([ms], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "docs/perf"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    rt = oneside.init(heap_size="32GiB", timeout=300)
    me, W = rt.rank, rt.world_size
    dev = torch.device("cuda", rt.backend.device)
    port = int(os.environ["MASTER_PORT"]) + 11
    dist.init_process_group("nccl", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{port}", rank=me,
                            world_size=W, device_id=dev)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    results: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for name in args.shapes.split(","):
        S, H, D = SHAPES[name]
        if S % W:
            raise SystemExit(f"{name}: {S} tokens do not divide by {W} ranks")
        g = torch.Generator(device=dev).manual_seed(S)
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        L, lo = S // W, me * (S // W)
        mine = [x[:, lo:lo + L].contiguous() for x in (q, k, v)]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)[:, lo:lo + L]
            row = {"sdpa_1gpu_cudnn": median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))}
        del qh, kh, vh
        err_row: dict[str, float] = {}

        def run(label: str, fn) -> None:
            out = fn()
            torch.cuda.synchronize()
            err = float(((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
            e = torch.tensor([err], device=dev, dtype=torch.float64)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            err_row[label] = float(e.item())
            if err_row[label] > 2e-2:
                raise SystemExit(f"{name} {label}: output differs from single-GPU SDPA (rel. error {err_row[label]:.3g})")
            row[label] = slowest(median_ms(fn), dev)
            if me == 0:
                print(f"{name:>9} {label:>28}: {row[label]:9.2f} ms  (err {err_row[label]:.1e})", flush=True)

        for U in [d for d in range(1, W + 1) if W % d == 0 and H % d == 0]:
            set_seq_parallel_pg(U, W // U, me, W, use_ulysses_low=True)
            for kind in (AttnType.TORCH_CUDNN, AttnType.TORCH_FLASH):
                attn = LongContextAttention(ring_impl_type="basic", attn_type=kind)
                run(f"yunchang U{U}xR{W // U} {kind.value}", lambda: attn(*mine))
        for algo in sfattn.ALGORITHMS:
            try:
                plan = sfattn.make_plan(rt.mesh, H, S, D, algo)
            except PlanError:
                continue
            for local in ("kernel", "torch"):
                layer = sfattn.SPAttention(rt, plan, 1, "bfloat16", local=local)
                run(f"sfattn {algo} {local}", lambda: sfattn.attention(*mine, layer))
                sfattn.release(layer)
                layer.close()
        results[name], errors[name] = row, err_row
        del q, k, v, mine, ref
        torch.cuda.empty_cache()
    if me == 0:
        meta = {"device": torch.cuda.get_device_name(dev), "mesh": f"{rt.mesh.machines}x{rt.mesh.gpus_per_machine}",
                "ranks": W, "torch": torch.__version__,
                "command": f"python -m oneside.launch -n {W} --backend nvshmem perf/attention_vs_peers.py"}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "peers.json").write_text(json.dumps({"meta": meta, "ms": results, "rel_error": errors},
                                                              indent=1))
    dist.destroy_process_group()
    oneside.finalize()


if __name__ == "__main__":
    main()
