"""Turn ``oneside.json`` (from bench_oneside.py) into the plot, the docs table and the summary keys.

    python perf/report_oneside.py [docs/perf/oneside.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, human, update_summary  # noqa: E402

ROWS = ["put", "get", "put (sm kernel)", "scatter_push x8", "gather_pull x8",
        "peer copy (memcpyPeer)", "nccl send/recv", "nccl all_to_all", "nvshmem4py put"]
BIG = str(256 << 20)


def main(path: Path) -> str:
    data = json.loads(path.read_text())
    sec = data["seconds"]
    issue = data["host_issue_seconds_per_transfer"]
    sizes = sorted({int(s) for name in ROWS if name in sec for s in sec[name]})
    summary = {
        "put_256MiB_over_peer_copy": round(sec["peer copy (memcpyPeer)"][BIG] / sec["put"][BIG], 3),
        "put_256MiB_over_nccl_sendrecv": round(sec["nccl send/recv"][BIG] / sec["put"][BIG], 3),
        "batched_issue_us_per_transfer": round(issue["auto"] * 1e6, 3),
    }
    update_summary(summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name in ROWS:
            if name in sec:
                xs = sorted(int(s) for s in sec[name])
                ax.plot(xs, [x / sec[name][str(x)] / 1e9 for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per call")
        ax.set_ylabel("GB/s (rank 0 -> rank 1)")
        ax.set_title(f"oneside vs peers, {data['meta']['device']} x{data['meta']['ranks']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    head = "| size | " + " | ".join(n for n in ROWS if n in sec) + " |"
    lines = [head, "|" + "---|" * (1 + sum(n in sec for n in ROWS))]
    for s in sizes:
        cells = [f"{s / sec[n][str(s)] / 1e9:.1f}" if str(s) in sec.get(n, {}) else "" for n in ROWS if n in sec]
        lines.append(f"| {human(s)} | " + " | ".join(cells) + " |")
    lines += ["", f"Barrier (barrier_all on a stream, {data['meta']['ranks']} ranks): "
              f"{sec['barrier_all']['0'] * 1e6:.1f} us of GPU time per barrier.", "",
              "Host time to issue, per transfer: " + "; ".join(
                  f"{k}: {v * 1e6:.2f} us" for k, v in issue.items()) + " (batches of 64 x 4 KiB for the "
              "engines; one call each for `rt.put` and nvshmem4py's `put`).", "",
              "Headline (also in `docs/perf/summary.json`): " + ", ".join(f"`{k}` = {v}" for k, v in summary.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "perf" / "oneside.json"))
