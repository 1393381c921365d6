"""Compute-only replay, on one GPU, of one rank's attention-kernel schedule in each algorithm.

    python perf/bench_schedule.py [--shapes flux3072,flux4096,video20s] [--reps 21]

On a 2 x 1 mesh (2 machines x 1 GPU) every algorithm does the same attention FLOPs per rank, but
in different kernel calls: USP (a 2-member ring) makes 2 calls over L = S/2 query rows and all
heads; TAS one call over all S rows and H/2 heads; Torus (T=2) 4 calls over L rows and H/2 heads
(Pull Q stage: own and partner Q chunk against the stationary K/V chunk; Pull KV stage: both Q
chunks against the pulled chunk). Smaller calls leave a larger part-empty last wave of thread
blocks. This replays exactly those calls (same lengths, heads, chaining of the running state,
init/finalize) with the data already in place -- no communication -- so the differences are the
schedule's compute overhead alone; 'torus_2streams' runs each Q chunk's chain on its own stream
so that one call's blocks fill the other's last wave. Timing: interleaved rounds, shuffled, median
(perf/common.py's interleaved_medians).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

SHAPES = {"flux3072": (36864 + 512, 24, 128), "flux4096": (65536 + 512, 24, 128),
          "video20s": (41 * 4080 + 226, 24, 64)}


def schedules(S: int, H: int, D: int):
    """{name: fn} replaying rank 0's kernel calls of each algorithm on a 2 x 1 mesh."""
    import torch
    from sfattn import kernels as K

    L, Hh = -(-S // 2), H // 2
    scale = 1 / math.sqrt(D)
    mk = lambda s, h: torch.randn(1, s, h, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    # USP: Q [L, H] against own K/V [L, H], then the ring peer's [L, H]
    q, k1, v1, k2, v2 = (mk(L, H) for _ in range(5))
    o = torch.empty_like(q)
    st = K.empty_state(1, L, H, D, like=q)
    u1 = K.AttnLaunch([q], [k1], [v1], st, scale, init=True)
    u2 = K.AttnLaunch([q], [k2], [v2], st, scale, out=[o], finalize=True)
    # TAS: Q [2L, H/2] against K/V [2L, H/2] (two blocks, one per source rank)
    qa, ka, va = (mk(2 * L, Hh) for _ in range(3))
    oa = torch.empty_like(qa)
    ta = K.AttnLaunch([qa[:, :L], qa[:, L:]], [ka[:, :L], ka[:, L:]], [va[:, :L], va[:, L:]], None,
                      scale, out=[oa[:, :L], oa[:, L:]], init=True, finalize=True)
    # Torus T=2: Q chunks t, o [L, H/2]; K/V chunks t, o [L, H/2]
    qt, qo, kt, vt, ko, vo = (mk(L, Hh) for _ in range(6))
    ot, oo = torch.empty_like(qt), torch.empty_like(qo)
    stt, sto = (K.empty_state(1, L, Hh, D, like=qt) for _ in range(2))
    c1 = K.AttnLaunch([qt], [kt], [vt], stt, scale, init=True)
    c2 = K.AttnLaunch([qo], [kt], [vt], sto, scale, init=True)
    c3 = K.AttnLaunch([qo], [ko], [vo], sto, scale, out=[oo], finalize=True)
    c4 = K.AttnLaunch([qt], [ko], [vo], stt, scale, out=[ot], finalize=True)
    side = torch.cuda.Stream()

    def usp():
        u1(init=True)
        u2(finalize=True)

    def tas():
        ta(init=True, finalize=True)

    def torus():
        c1(init=True)
        c2(init=True)
        c3(finalize=True)
        c4(finalize=True)

    def torus_2streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        c1(init=True)
        with torch.cuda.stream(side):
            c2(init=True, stream=side)
            c3(finalize=True, stream=side)
        c4(finalize=True)
        main.wait_stream(side)

    return {"usp": usp, "tas": tas, "torus": torus, "torus_2streams": torus_2streams}


def plot(data: dict, path: Path) -> None:
    """Bars: each schedule's time relative to USP's, per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(data["ms"])
    names = list(data["ms"][shapes[0]])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * w for j in range(len(shapes))],
               [data["ms"][s][n] / data["ms"][s]["usp"] for s in shapes], w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], shapes)
    ax.set_ylim(0.95, 1.06)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("time / USP's (compute only)")
    ax.set_title(f"One rank's kernel schedule on a 2x1 mesh, replayed on one {data['device']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import torch
    from common import interleaved_medians

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--plot", metavar="JSON", help="only draw docs/perf/schedule.png from this JSON")
    a = ap.parse_args()
    if a.plot:
        plot(json.loads(Path(a.plot).read_text()), ROOT / "docs" / "perf" / "schedule.png")
        return
    res = {}
    for name in a.shapes.split(","):
        S, H, D = SHAPES[name]
        fns = schedules(S, H, D)
        ms = {k: v * 1e3 for k, v in interleaved_medians(fns, 3, a.reps).items()}
        res[name] = ms
        print(f"{name:>9}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + f"  | torus/usp {ms['torus'] / ms['usp']:.3f}, torus_2streams/usp "
                f"{ms['torus_2streams'] / ms['usp']:.3f}", flush=True)
        del fns
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "ms": res,
                                           "command": "python perf/bench_schedule.py"}, indent=1))


if __name__ == "__main__":
    main()
