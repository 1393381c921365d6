"""Benchmark of the fused multi-block attention kernel against torch SDPA (cuDNN, flash) and
flash-attn (if importable): TFLOP/s = 4 * B * H * Sq * Sk * D / t, bf16, non-causal.

GPU run (writes kernel.json into --out-dir)::

    PYTHONUNBUFFERED=1 python perf/bench_kernel.py --out-dir docs/perf

Docs from a JSON file (no GPU; writes docs/perf/kernel.png, the table in docs/perf-kernel.md and the
keys kernel_over_cudnn_d128_s16k / kernel_4block_overhead of docs/perf/summary.json)::

    python perf/bench_kernel.py --from-json docs/perf/kernel.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from common import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]


def run(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from sfattn import kernels as K
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001
        flash_attn_func = None

    dev = torch.cuda.get_device_name(0)
    H, B = args.heads, 1
    rows = []
    impls = args.impls
    for D in args.head_dims:
        for S in args.seqs:
            g = torch.Generator(device="cuda").manual_seed(S + D)
            q, k, v = (torch.randn((B, S, H, D), generator=g, device="cuda",
                                   dtype=torch.float32).to(torch.bfloat16) for _ in range(3))
            scale = 1 / math.sqrt(D)
            flops = 4.0 * B * H * S * S * D
            reps = max(3, min(args.reps, int(2e14 / flops) + 3))
            res = {"seq": S, "head_dim": D, "heads": H, "batch": B}
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # BHSD views for SDPA

            out = torch.empty_like(q)
            lse = torch.empty((B, H, S), device="cuda", dtype=torch.float32)
            fns = {}  # label -> callable, all timed interleaved below
            for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                   ("torch_flash", SDPBackend.FLASH_ATTENTION)):
                def call(backend=backend):
                    with sdpa_kernel(backend):
                        return sdpa(qt, kt, vt, scale=scale)
                try:
                    call()
                    fns[label] = call
                except Exception as e:  # noqa: BLE001
                    print(f"  sdpa {label} failed: {e}", flush=True)
                    res[label] = None
            if flash_attn_func is not None:
                fns["flash_attn"] = lambda: flash_attn_func(q, k, v, softmax_scale=scale)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o_ref = sdpa(qt, kt, vt, scale=scale).transpose(1, 2).float()
            for impl in impls:
                if impl == "fa2" and S > args.fa2_max_seq:
                    continue
                # accuracy spot check against the cuDNN output (bf16 both), poisoned output first
                out.fill_(float("nan"))
                K.AttnLaunch([q], [k], [v], None, scale, out=[out], impl=impl, finalize=True,
                             init=True)(init=True, finalize=True)
                res[f"{impl}_relerr_vs_cudnn"] = (torch.linalg.vector_norm(out.float() - o_ref) /
                                                  torch.linalg.vector_norm(o_ref)).item()
                for nb in args.blocks:
                    lens = [S // nb] * nb
                    lens[-1] += S - sum(lens)
                    ks, vs, r = [], [], 0
                    for n in lens:
                        ks.append(k[:, r:r + n])
                        vs.append(v[:, r:r + n])
                        r += n
                    try:
                        launch = K.AttnLaunch([q], ks, vs, None, scale, out=[out], lse=lse,
                                              impl=impl, finalize=True, init=True)
                        fns[f"{impl}_{nb}blk"] = lambda launch=launch: launch(init=True,
                                                                             finalize=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {impl} {nb} blocks failed: {e}", flush=True)
                        res[f"{impl}_{nb}blk"] = None
            del o_ref
            for label, t in interleaved_medians(fns, args.warmup, reps).items():
                res[label] = flops / t / 1e12
            # per-call host overhead of the prepared launch (tiny problem)
            rows.append(res)
            print(json.dumps({k_: (round(v_, 1) if isinstance(v_, float) and v_ > 1 else v_)
                              for k_, v_ in res.items()}), flush=True)
            del q, k, v, qt, kt, vt, out
            torch.cuda.empty_cache()
    # host-side cost of one prepared launch and one full attn_blocks call
    q = torch.randn((1, 128, 2, 128), device="cuda", dtype=torch.bfloat16)
    kb = [q[:, i * 32:(i + 1) * 32] for i in range(4)]
    st = K.empty_state(1, 128, 2, 128, like=q)
    launch = K.AttnLaunch([q], kb, kb, st, 0.1)
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        launch(init=True)
    t_launch = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n // 4):
        K.attn_blocks([q], kb, kb, st, 0.1, init=True)
    t_call = (time.perf_counter() - t0) / (n // 4)
    torch.cuda.synchronize()
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "command": "PYTHONUNBUFFERED=1 python perf/bench_kernel.py " + " ".join(sys.argv[1:]),
            "dtype": "bf16", "causal": False, "rows": rows,
            "host_us_prepared_launch": t_launch * 1e6, "host_us_attn_blocks_call": t_call * 1e6,
            "default_impl": K.default_impl(0), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                       time.gmtime())}


def write_docs(data: dict, json_path: Path) -> None:
    """PNG plot, markdown table (docs/perf-kernel.md section) and summary.json keys."""
    impl = data.get("default_impl", "sm90ws")
    rows = data["rows"]
    others = sorted({k[:-5] for r in rows for k in r if k.endswith("_1blk")} - {impl})
    docs = ROOT / "docs"
    (docs / "perf").mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, D in zip(axes, (64, 128)):
            rs = [r for r in rows if r["head_dim"] == D]
            xs = [r["seq"] for r in rs]
            series = [("cudnn", "torch SDPA cuDNN", "k-"), ("torch_flash", "torch SDPA flash", "k--"),
                      ("flash_attn", "flash-attn", "k:"),
                      (f"{impl}_1blk", f"sfattn {impl}, 1 kv block", "C0-o"),
                      (f"{impl}_4blk", f"sfattn {impl}, 4 kv blocks", "C1-s"),
                      (f"{impl}_8blk", f"sfattn {impl}, 8 kv blocks", "C2-^")]
            series += [(f"{o}_1blk", f"sfattn {o}, 1 block", f"C{3 + i}-x")
                       for i, o in enumerate(others)]
            for key, lab, st in series:
                ys = [r.get(key) for r in rs]
                if any(y is not None for y in ys):
                    ax.plot([x for x, y in zip(xs, ys) if y is not None],
                            [y for y in ys if y is not None], st, label=lab)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (q = kv)")
            ax.set_title(f"head_dim {D}, {rows[0]['heads']} heads, bf16")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("TFLOP/s")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Attention forward on {data['device']}")
        fig.tight_layout()
        fig.savefig(docs / "perf" / "kernel.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    cols = [c for c in ("cudnn", "torch_flash", "flash_attn", f"{impl}_1blk", f"{impl}_2blk",
                        f"{impl}_4blk", f"{impl}_8blk", *[f"{o}_1blk" for o in others])
            if any(r.get(c) is not None for r in rows)]
    lines = ["## Attention kernel", "",
             f"Device: {data['device']}, torch {data['torch']}, bf16, non-causal, batch 1, "
             f"{rows[0]['heads']} heads; TFLOP/s = 4·B·H·Sq·Sk·D / t (median of CUDA-event "
             f"timings after warm-up). `{impl}_Nblk` = this package's default kernel on this GPU "
             f"with the keys split into N blocks (one launch); other columns `IMPL_1blk`: its other "
             f"implementations (sm90ws: warp-specialised wgmma, sm90ws128: same with 128-key "
             f"tiles, sm90ws:TMA=0: K/V loaded with cp.async instead of TMA, sm90: wgmma without warp specialisation (removed after v5; kept in old tables), fa2: portable mma.sync).",
             "", f"Command: `{data['command']}` ({data['date']}); docs regenerated with "
             f"`python perf/bench_kernel.py --from-json docs/perf/kernel.json`.", "",
             "| head_dim | seq | " + " | ".join(cols) + " | sfattn / cuDNN |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        vals = [("%.0f" % r[c]) if r.get(c) is not None else "-" for c in cols]
        ratio = (r.get(f"{impl}_1blk") or 0) / r["cudnn"] if r.get("cudnn") else None
        lines.append(f"| {r['head_dim']} | {r['seq']} | " + " | ".join(vals) +
                     f" | {'%.2f' % ratio if ratio else '-'} |")
    lines += ["", f"Host cost: prepared `AttnLaunch` call {data['host_us_prepared_launch']:.1f} us, "
              f"full `attn_blocks` call (4 kv blocks) {data['host_us_attn_blocks_call']:.1f} us.",
              "", "![kernel](perf/kernel.png)", ""]
    (docs / "perf-kernel.md").write_text("\n".join(lines))
    # summary keys: at head_dim 128, the smallest seq >= 16k
    cand = sorted((r for r in rows if r["head_dim"] == 128 and r["seq"] >= 16384),
                  key=lambda r: r["seq"])
    summ_path = docs / "perf" / "summary.json"
    summ = json.loads(summ_path.read_text()) if summ_path.exists() else {}
    if cand and cand[0].get("cudnn") and cand[0].get(f"{impl}_1blk"):
        r = cand[0]
        summ["kernel_over_cudnn_d128_s16k"] = round(r[f"{impl}_1blk"] / r["cudnn"], 3)
        if r.get(f"{impl}_4blk"):
            summ["kernel_4block_overhead"] = round(r[f"{impl}_1blk"] / r[f"{impl}_4blk"] - 1, 4)
    summ_path.write_text(json.dumps(summ, indent=2, sort_keys=True) + "\n")
    print(f"wrote {docs / 'perf-kernel.md'}, {summ_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "perf"))
    ap.add_argument("--from-json", help="only regenerate docs from this kernel.json")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--impls", nargs="+",
                    default=["sm90ws", "sm90ws128", "sm90ws:TMA=0", "fa2"],
                    help="kernel variants, e.g. sm90ws sm90ws:BN=160,PP=0 fa2")
    ap.add_argument("--fa2-max-seq", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if args.from_json:
        write_docs(json.loads(Path(args.from_json).read_text()), Path(args.from_json))
        return
    data = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out / 'kernel.json'}")


if __name__ == "__main__":
    main()
