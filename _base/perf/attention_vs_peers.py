"""sfattn side by side with yunchang (xDiT's USP) and single-GPU SDPA, on the same GPUs, one job.

    python -m oneside.launch -n 2 --backend nvshmem perf/attention_vs_peers.py [--shapes flux3072,...] [--out DIR]
    python -m oneside.launch -n 2 --backend host perf/attention_vs_peers.py --shapes 64x4x32   # CPU check

Shapes: Flux 1024^2 / 3072^2 / 4096^2 (24 heads x 128, 512 text tokens joined to the image
tokens) and CogVideoX-class 20 s / 40 s videos (24 heads x 64, 41 / 82 latent frames x 4080
+ 226 text tokens; video40s is model.py's); ``SxHxD`` names any other shape. The text tokens
are part of the sequence and sharded like the image tokens, the same for every
implementation. For each shape: torch SDPA (cuDNN) on one GPU over the whole sequence (also
the reference); yunchang 0.6.4 ``LongContextAttention`` (USP over NCCL; inputs and outputs
``[B, S/N, H, D]``, rank r holding rows ``r*S/N ...``) for every Ulysses x Ring split with its
TORCH_CUDNN and TORCH_FLASH local kernels; every sfattn algorithm with its own kernel and with
the torch (cuDNN) local path. Two yunchang 0.6.4 properties shape the list:

* its TORCH_CUDNN path returns a log-sum-exp of zeros, so its ring merge averages the blocks:
  wrong whenever the ring degree is > 1. Those splits are skipped (listed under ``skipped``);
* its TORCH_FLASH path rounds the log-sum-exp to bf16 before the ring merge (max-abs error
  ~2e-2 of the output's max on random inputs, measured on CPU with these shapes' statistics),
  so ring splits are checked at ``YUNCHANG_RING_TOL`` instead of ``TOL``.

Every output is checked against the single-GPU reference (max-abs error / max-abs reference)
before it is timed; times are the slowest rank's median of 10 CUDA-event-timed calls after 3
warm-up calls. Writes ``peers[_TAG].json``; ``perf/report_peers.py`` makes the table, the chart
and the summary keys. On the host backend (CPU, gloo) nothing is timed: the float32 math
reference, yunchang's pure-Ulysses split with TORCH_MATH (its only CPU path: the flash and
cuDNN ops are CUDA-only) and both sfattn local paths are checked (tests/test_peers.py).
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
          "video20s": (41 * 4080 + 226, 24, 64), "video40s": (82 * 4080 + 226, 24, 64)}
TOL = 2e-2               # sfattn and yunchang's pure-Ulysses splits vs the reference
YUNCHANG_RING_TOL = 6e-2  # yunchang ring splits: bf16 log-sum-exp in the merge (see above)


def parse_shape(name: str) -> tuple[int, int, int]:
    """A name of SHAPES or ``SxHxD`` -> (seq_len, heads, head_dim)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        S, H, D = (int(x) for x in name.split("x"))
    except ValueError:
        raise ValueError(f"shape {name!r}: expected one of {sorted(SHAPES)} or SxHxD (e.g. 64x4x32)") from None
    if min(S, H, D) < 1:
        raise ValueError(f"shape {name!r}: sizes must be positive")
    return S, H, D


def yunchang_configs(world: int, heads: int, gpu: bool) -> tuple[list[tuple[int, str]], dict[str, str]]:
    """(Ulysses degree, AttnType name) pairs to run, and the skipped ones with the reason."""
    run, skipped = [], {}
    for U in (d for d in range(1, world + 1) if world % d == 0):
        R = world // U
        for kind in (("TORCH_CUDNN", "TORCH_FLASH") if gpu else ("TORCH_MATH",)):
            label = f"yunchang U{U}xR{R} {kind.lower()}"
            if heads % U:
                skipped[label] = f"{heads} heads do not divide by Ulysses degree {U}"
            elif R > 1 and kind in ("TORCH_CUDNN", "TORCH_MATH"):
                skipped[label] = (f"yunchang 0.6.4's {kind} path returns a zero log-sum-exp: its ring merge "
                                  "is wrong for ring degree > 1")
            else:
                run.append((U, kind))
    return run, skipped


def rel_error(out: torch.Tensor, ref: torch.Tensor, ref_max: float) -> float:
    """max |out - ref| / max |ref| (ref_max given), in float32 chunks (no full float copy)."""
    worst = 0.0
    for a, b in zip(out.split(4096, dim=1), ref.split(4096, dim=1)):
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst / ref_max


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "docs/perf"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tag", default="", help="write peers_TAG.json (e.g. when shapes are split over runs)")
    ap.add_argument("--check-only", action="store_true", help="check outputs, time nothing (implied on CPUs)")
    args = ap.parse_args(argv)
    shapes = {name: parse_shape(name) for name in args.shapes.split(",")}
    if args.tag and not all(c.isalnum() or c in "._-" for c in args.tag):
        ap.error(f"--tag {args.tag!r}: letters, digits and ._- only")
    rt = oneside.init(heap_size=os.environ.get("PEERS_HEAP", "32GiB"), timeout=300)
    me, W, gpu = rt.rank, rt.world_size, rt.backend.is_gpu
    timed = gpu and not args.check_only
    for name, (S, H, D) in shapes.items():
        if S % W:
            raise SystemExit(f"{name}: {S} tokens do not divide by {W} ranks (yunchang needs equal shards)")
    dev = torch.device("cuda", rt.backend.device) if gpu else torch.device("cpu")
    port = os.environ.get("ONESIDE_DIST_PORT") or int(os.environ["MASTER_PORT"]) + 11
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{port}",
                            rank=me, world_size=W, **({"device_id": dev} if gpu else {}))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    groups: dict[int, tuple] = {}  # one set of process groups per Ulysses degree, made once

    def yunchang_layer(U: int, kind: str):
        if U not in groups:
            set_seq_parallel_pg(U, W // U, me, W, use_ulysses_low=True)
            groups[U] = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = groups[U]
        return LongContextAttention(ring_impl_type="basic", attn_type=getattr(AttnType, kind))

    def slowest(x: float) -> float:
        t = torch.tensor([x], device=dev, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    write = _writer(args, rt, shapes, timed)
    results: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    skipped_all: dict[str, str] = {}
    for name, (S, H, D) in shapes.items():
        configs, skipped = yunchang_configs(W, H, gpu)
        skipped_all.update(skipped)
        g = torch.Generator(device=dev).manual_seed(S)
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        L, lo = S // W, me * (S // W)
        mine = [x[:, lo:lo + L].contiguous() for x in (q, k, v)]
        row: dict[str, float] = {}
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        if gpu:  # the reference is also the single-GPU baseline: cuDNN SDPA, bf16
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
                ref = sdpa().transpose(1, 2)[:, lo:lo + L].contiguous()
                if timed:
                    row["sdpa_1gpu_cudnn"] = median_ms(sdpa)
        else:
            ref = torch.nn.functional.scaled_dot_product_attention(qh.float(), kh.float(), vh.float())
            ref = ref.transpose(1, 2)[:, lo:lo + L].contiguous()
        del qh, kh, vh, q, k, v
        ref_max = slowest(float(ref.abs().max()))  # the same scale on every rank
        err_row: dict[str, float] = {}

        def run(label: str, fn, tol: float) -> None:
            err_row[label] = slowest(rel_error(fn(), ref, ref_max))
            if err_row[label] > tol:
                raise SystemExit(f"{name} {label}: output differs from the single-GPU reference "
                                 f"(rel. error {err_row[label]:.3g} > {tol:g})")
            if timed:
                row[label] = slowest(median_ms(fn))
            if me == 0:
                t = f"{row[label]:9.2f} ms" if timed else "  checked"
                print(f"{name:>9} {label:>28}: {t}  (err {err_row[label]:.1e})", flush=True)

        for U, kind in configs:
            attn = yunchang_layer(U, kind)
            run(f"yunchang U{U}xR{W // U} {kind.lower()}", lambda: attn(*mine), TOL if U == W else YUNCHANG_RING_TOL)
        for algo in sfattn.ALGORITHMS:
            try:
                plan = sfattn.make_plan(rt.mesh, H, S, D, algo)
            except PlanError as e:
                skipped_all[f"sfattn {algo} ({name})"] = str(e)
                continue
            for local in ("kernel", "torch"):
                layer = sfattn.SPAttention(rt, plan, 1, "bfloat16", local=local)
                run(f"sfattn {algo} {local}", lambda: sfattn.attention(*mine, layer), TOL)
                sfattn.release(layer)
                layer.close()
        results[name], errors[name] = row, err_row
        del mine, ref
        if gpu:
            torch.cuda.empty_cache()
        if me == 0:  # after every shape: a run cut short keeps the shapes it finished
            write(results, errors, skipped_all)
    dist.barrier()
    dist.destroy_process_group()
    oneside.finalize()


def _writer(args, rt, shapes: dict, timed: bool):
    """``write(results, errors, skipped)``: (re)writes peers[_TAG].json with the shapes done so far."""
    gpu, W = rt.backend.is_gpu, rt.world_size
    out = Path(args.out) / f"peers{'_' + args.tag if args.tag else ''}.json"
    meta = {"device": torch.cuda.get_device_name(rt.backend.device) if gpu else "cpu",
            "mesh": f"{rt.mesh.machines}x{rt.mesh.gpus_per_machine}", "ranks": W, "torch": torch.__version__,
            "timed": timed, "tolerance": TOL, "yunchang_ring_tolerance": YUNCHANG_RING_TOL,
            "shapes": {n: dict(seq_len=s, heads=h, head_dim=d) for n, (s, h, d) in shapes.items()},
            "command": f"python -m oneside.launch -n {W} --backend {rt.backend.name} perf/attention_vs_peers.py"
                       + ("" if list(shapes) == list(SHAPES) else f" --shapes {args.shapes}")}

    def write(results: dict, errors: dict, skipped: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "ms": results, "rel_error": errors, "skipped": skipped},
                                  indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {out} ({len(results)} of {len(shapes)} shapes)", flush=True)

    return write


if __name__ == "__main__":
    main()
