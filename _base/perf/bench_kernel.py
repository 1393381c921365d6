"""Benchmark of the fused multi-block attention kernel against torch SDPA (cuDNN, flash) and
FlashAttention-3 (``fa3_fwd``, if importable): TFLOP/s = 4 * B * H * Sq * Sk * D / t, bf16,
non-causal.  Every variant of one shape runs on the same tensors, timed interleaved.

GPU run (writes kernel.json into --out-dir)::

    PYTHONUNBUFFERED=1 python perf/bench_kernel.py --out-dir docs/perf            # table + FA3 shapes
    PYTHONUNBUFFERED=1 python perf/bench_kernel.py --shapes fa3 --impls sm90ws sm90ws:NC=3

Docs from a JSON file (no GPU; writes docs/perf/kernel.png, the table in docs/perf-kernel.md and the
kernel_* keys of docs/perf/summary.json)::

    python perf/bench_kernel.py --from-json docs/perf/kernel.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

from common import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]

# (B, S, H, D) of the FA3 comparison (Flux 1024^2..4096^2 and video shapes; kernel issue)
FA3_SHAPES = [(1, 16384, 24, 128), (1, 37376, 12, 128), (1, 66560, 12, 128), (2, 16384, 40, 128),
              (1, 16384, 24, 64), (1, 84000, 12, 64), (1, 4096, 24, 128)]
REF_ROWS = 512  # query rows (spread over the sequence) checked against the float32 reference


def _fa3():
    """FlashAttention-3's forward (the fa3_fwd wheel), or None."""
    try:
        from fa3_fwd_interface import flash_attn_func
        return flash_attn_func
    except Exception:  # noqa: BLE001 - absent or not loadable on this torch
        return None


def _ref_rows(q, k, v, scale, rows):
    """float32 attention of the query rows ``rows`` (all heads, all keys)."""
    import torch
    qf = q[:, rows].float().transpose(1, 2)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
    p = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, vf).transpose(1, 2)


def run(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from sfattn import kernels as K
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    torch.backends.cuda.matmul.allow_tf32 = False
    fa3 = _fa3()
    print(f"FA3: {'fa3_fwd' if fa3 else 'not importable'}", flush=True)
    dev = torch.cuda.get_device_name(0)
    default = K.default_impl(0)
    impls = args.impls
    if args.shapes == "fa3":
        shapes = FA3_SHAPES
    elif args.shapes == "table":
        shapes = [(1, S, args.heads, D) for D in args.head_dims for S in args.seqs]
    else:
        shapes = FA3_SHAPES + [(1, S, args.heads, D) for D in args.head_dims for S in args.seqs
                               if (1, S, args.heads, D) not in FA3_SHAPES]
    rows = []
    for B, S, H, D in shapes:
        g = torch.Generator(device="cuda").manual_seed(S + D + 1000 * B + H)
        q, k, v = (torch.randn((B, S, H, D), generator=g, device="cuda",
                               dtype=torch.float32).to(torch.bfloat16) for _ in range(3))
        scale = 1 / math.sqrt(D)
        flops = 4.0 * B * H * S * S * D
        reps = max(3, min(args.reps, int(2e14 / flops) + 3))
        res = {"seq": S, "head_dim": D, "heads": H, "batch": B}
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # BHSD views for SDPA
        ref_rows = torch.linspace(0, S - 1, min(S, REF_ROWS), device="cuda").long()
        o_ref = _ref_rows(q, k, v, scale, ref_rows)

        def relerr(o):
            o = o[:, ref_rows].float()
            return (torch.linalg.vector_norm(o - o_ref) / torch.linalg.vector_norm(o_ref)).item()

        out = torch.empty_like(q)
        lse = torch.empty((B, H, S), device="cuda", dtype=torch.float32)
        fns = {}  # label -> callable, all timed interleaved below
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("torch_flash", SDPBackend.FLASH_ATTENTION)):
            if label == "torch_flash" and not args.torch_flash:
                continue
            def call(backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(qt, kt, vt, scale=scale)
            try:
                res[f"{label}_relerr"] = relerr(call().transpose(1, 2))
                fns[label] = call
            except Exception as e:  # noqa: BLE001
                print(f"  sdpa {label} failed: {e}", flush=True)
                res[label] = None
        if fa3 is not None:
            def call_fa3():
                with torch.no_grad():
                    return fa3(q, k, v, softmax_scale=scale)
            res["fa3_relerr"] = relerr(call_fa3())
            fns["fa3"] = call_fa3
        for impl in impls:
            if impl == "fa2" and S > args.fa2_max_seq:
                continue
            out.fill_(float("nan"))  # poisoned: every row must be written
            try:
                K.AttnLaunch([q], [k], [v], None, scale, out=[out], impl=impl, finalize=True,
                             init=True)(init=True, finalize=True)
            except ValueError as e:  # a configuration this head dim does not have (CL=2 at 64)
                print(f"  {impl} skipped at head dim {D}: {e}", flush=True)
                continue
            res[f"{impl}_relerr"] = relerr(out)
            if not torch.isfinite(out).all():
                res[f"{impl}_relerr"] = float("nan")
            for nb in (args.blocks if impl == impls[0] else [1]):
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
                    fns[f"{impl}_{nb}blk"] = lambda launch=launch: launch(init=True, finalize=True)
                except Exception as e:  # noqa: BLE001
                    print(f"  {impl} {nb} blocks failed: {e}", flush=True)
                    res[f"{impl}_{nb}blk"] = None
        del o_ref
        for label, t in interleaved_medians(fns, args.warmup, reps).items():
            res[label] = flops / t / 1e12
        rows.append(res)
        print(json.dumps({k_: (round(v_, 1) if isinstance(v_, float) and v_ > 1 else
                               (float("%.3g" % v_) if isinstance(v_, float) else v_))
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
            "dtype": "bf16", "causal": False, "rows": rows, "impls": impls,
            "fa3": "fa3_fwd" if fa3 else None,
            "host_us_prepared_launch": t_launch * 1e6, "host_us_attn_blocks_call": t_call * 1e6,
            "default_impl": default, "main_impl": impls[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _fa3_keys(rows: list[dict], impl: str) -> dict:
    """The kernel issue's same-run ratios from one card's rows (missing where not measured)."""
    def get(B, S, H, D):
        for r in rows:
            if (r.get("batch", 1), r["seq"], r["heads"], r["head_dim"]) == (B, S, H, D):
                return r
        return None

    def ratio(r, peer):
        return r[f"{impl}_1blk"] / r[peer] if r and r.get(peer) and r.get(f"{impl}_1blk") else None

    out = {}
    r16 = get(1, 16384, 24, 128)
    if ratio(r16, "fa3"):
        out["kernel_over_fa3_d128_s16k"] = ratio(r16, "fa3")
    mins = [ratio(get(*sh), "fa3") for sh in ((1, 4096, 24, 128), (1, 16384, 24, 128),
                                             (1, 37376, 12, 128), (1, 66560, 12, 128))]
    if all(mins):
        out["kernel_over_fa3_d128_min"] = min(mins)
    if ratio(get(1, 16384, 24, 64), "fa3"):
        out["kernel_over_fa3_d64_s16k"] = ratio(get(1, 16384, 24, 64), "fa3")
    if ratio(r16, "cudnn"):
        out["kernel_over_cudnn_d128_s16k"] = ratio(r16, "cudnn")
    if r16 and r16.get(f"{impl}_1blk") and r16.get(f"{impl}_4blk"):
        out["kernel_4block_overhead"] = r16[f"{impl}_1blk"] / r16[f"{impl}_4blk"] - 1
    errs = [r[f"{impl}_relerr"] / r["fa3_relerr"] for r in rows
            if r.get("fa3_relerr") and r.get(f"{impl}_relerr") is not None]
    if errs:
        out["kernel_relerr_over_fa3_max"] = max(errs)
    return {k: round(v, 4) for k, v in out.items()}


def write_docs(data: dict, json_path: Path) -> None:
    """PNG plot, markdown table (docs/perf-kernel.md) and the kernel keys of summary.json."""
    impl = data.get("main_impl") or data.get("default_impl", "sm90ws")
    rows = data["rows"]
    others = [i for i in data.get("impls", sorted({k[:-5] for r in rows for k in r
                                                   if k.endswith("_1blk")})) if i != impl]
    docs = ROOT / "docs"
    (docs / "perf").mkdir(parents=True, exist_ok=True)
    table = [r for r in rows if r.get("batch", 1) == 1 and r["heads"] == 24]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, D in zip(axes, (64, 128)):
            rs = sorted((r for r in table if r["head_dim"] == D), key=lambda r: r["seq"])
            xs = [r["seq"] for r in rs]
            series = [("cudnn", "torch SDPA cuDNN", "k-"), ("torch_flash", "torch SDPA flash", "k--"),
                      ("fa3", "FlashAttention-3", "r-"),
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
            ax.set_title(f"head_dim {D}, 24 heads, batch 1, bf16")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("TFLOP/s")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Attention forward on {data['device']}")
        fig.tight_layout()
        fig.savefig(docs / "perf" / "kernel.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    cols = [c for c in ("cudnn", "torch_flash", "fa3", f"{impl}_1blk", f"{impl}_2blk",
                        f"{impl}_4blk", f"{impl}_8blk", *[f"{o}_1blk" for o in others])
            if any(r.get(c) is not None for r in rows)]
    lines = ["## Attention kernel", "",
             f"Device: {data['device']}, torch {data['torch']}, bf16, non-causal; TFLOP/s = "
             f"4·B·H·Sq·Sk·D / t (median of CUDA-event timings, all columns of a row timed "
             f"interleaved on the same tensors). `fa3`: FlashAttention-3's forward "
             f"({data.get('fa3') or 'not measured'}). `{impl}_Nblk` = this package's default kernel "
             f"with the keys split into N blocks (one launch); `IMPL_1blk`: other configurations "
             f"(`sm90ws:NAME=value` knobs, see docs/kernel-notes.md). Relative errors: vs a float32 "
             f"reference on {REF_ROWS} query rows.",
             "", f"Command: `{data['command']}` ({data['date']}); docs regenerated with "
             f"`python perf/bench_kernel.py --from-json docs/perf/kernel.json`.", "",
             "| B | S | H | D | " + " | ".join(cols) + " | / cuDNN | / FA3 | rel err (ours, FA3) |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
    for r in rows:
        vals = [("%.0f" % r[c]) if r.get(c) is not None else "-" for c in cols]
        mine = r.get(f"{impl}_1blk")
        rc = "%.2f" % (mine / r["cudnn"]) if mine and r.get("cudnn") else "-"
        rf = "%.2f" % (mine / r["fa3"]) if mine and r.get("fa3") else "-"
        errs = ", ".join("%.2g" % r[k] if r.get(k) is not None else "-"
                         for k in (f"{impl}_relerr", "fa3_relerr"))
        lines.append(f"| {r.get('batch', 1)} | {r['seq']} | {r['heads']} | {r['head_dim']} | " +
                     " | ".join(vals) + f" | {rc} | {rf} | {errs} |")
    lines += ["", f"Host cost: prepared `AttnLaunch` call {data['host_us_prepared_launch']:.1f} us, "
              f"full `attn_blocks` call (4 kv blocks) {data['host_us_attn_blocks_call']:.1f} us.",
              "", "![kernel](perf/kernel.png)", ""]
    (docs / "perf-kernel.md").write_text("\n".join(lines))
    # summary keys: per card, and each key the minimum (the relerr ratio the maximum) over cards
    summ_path = docs / "perf" / "summary.json"
    summ = json.loads(summ_path.read_text()) if summ_path.exists() else {}
    cards = summ.get("kernel_cards", {})
    keys = _fa3_keys(rows, impl)
    if keys:
        cards[data["device"]] = {**keys, "date": data["date"]}
        summ["kernel_cards"] = cards
        for k in keys:
            vals = [c[k] for c in cards.values() if k in c]
            summ[k] = max(vals) if k.endswith("_max") or k.endswith("_overhead") else min(vals)
    summ_path.write_text(json.dumps(summ, indent=2, sort_keys=True) + "\n")
    print(f"wrote {docs / 'perf-kernel.md'}, {summ_path}: {json.dumps(keys)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "perf"))
    ap.add_argument("--from-json", help="only regenerate docs from this kernel.json")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--shapes", choices=("all", "fa3", "table"), default="all",
                    help="fa3: the FA3 comparison shapes; table: --seqs x --head-dims with --heads; "
                         "all: both")
    ap.add_argument("--torch-flash", action="store_true", help="also time SDPA's flash backend")
    ap.add_argument("--impls", nargs="+", default=["sm90ws", "sm90ws128", "sm90ws:TMA=0"],
                    help="kernel variants, the first one also with --blocks key blocks; "
                         "e.g. sm90ws sm90ws:BN=160,PP=0 fa2")
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
