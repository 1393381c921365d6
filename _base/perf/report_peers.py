"""Table, bar chart and summary keys from ``peers[_TAG].json`` files (attention_vs_peers.py).

    python perf/report_peers.py docs/perf/peers.json [docs/perf/peers_video40s.json ...]

Several files (shapes split over runs) are merged by shape, later files winning. Summary keys,
as issue 5 defines them (same local kernel: yunchang's TORCH_CUDNN vs sfattn's torch local
path, which calls cuDNN SDPA; "best" = fastest over every split / algorithm):

* ``best_over_yunchang_flux3072_same_kernel``: best yunchang cuDNN / best sfattn torch-local, Flux 3072^2;
* ``worst_over_yunchang_any_shape``: the same ratio's minimum over the shapes;
* ``worst_over_yunchang_any_shape_any_kernel``: best yunchang (any kernel) / best sfattn (any
  local path), minimum over the shapes (what a user picking the fastest of each gets).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import update_summary  # noqa: E402


def best(row: dict[str, float], prefix: str, suffix: str = "") -> float:
    vals = [v for k, v in row.items() if k.startswith(prefix) and k.endswith(suffix)]
    if not vals:
        raise ValueError(f"no '{prefix}...{suffix}' entry in {sorted(row)}")
    return min(vals)


def load(paths: list[Path]) -> tuple[dict, dict[str, dict[str, float]]]:
    """(meta of the first file, ms rows merged by shape); only timed files."""
    if not paths:
        raise ValueError("give at least one peers.json")
    meta, ms = None, {}
    for path in paths:
        data = json.loads(path.read_text())
        if not data["meta"].get("timed", True):
            raise ValueError(f"{path}: an untimed (--check-only / CPU) run has no times to report")
        meta = meta or data["meta"]
        ms.update(data["ms"])
    return meta, ms


def main(paths: list[Path]) -> str:
    meta, ms = load(paths)
    path = paths[0]
    summary, lines = {}, [f"`{meta['command']}` ({meta['ranks']} x {meta['device']})", "",
                          "| shape | SDPA 1 GPU | best yunchang (cuDNN) | best yunchang (any) | best sfattn (torch local) "
                          "| best sfattn (any) | sfattn/yunchang, same kernel | sfattn/yunchang, best |",
                          "|---|---|---|---|---|---|---|---|"]
    worst, worst_any = [], []
    for shape, row in ms.items():
        yc, ya = best(row, "yunchang", "torch_cudnn"), best(row, "yunchang")
        st, sa = best(row, "sfattn", " torch"), best(row, "sfattn")
        worst.append(yc / st)
        worst_any.append(ya / sa)
        lines.append(f"| {shape} | {row['sdpa_1gpu_cudnn']:.2f} | {yc:.2f} | {ya:.2f} | {st:.2f} | {sa:.2f} | "
                     f"{yc / st:.3f}x | {ya / sa:.3f}x |")
        if shape == "flux3072":
            summary["best_over_yunchang_flux3072_same_kernel"] = round(yc / st, 3)
    summary["worst_over_yunchang_any_shape"] = round(min(worst), 3)
    summary["worst_over_yunchang_any_shape_any_kernel"] = round(min(worst_any), 3)
    lines += ["", f"Same local kernel (cuDNN): sfattn over yunchang at worst {min(worst):.3f}x; "
                  f"best of each (any kernel): at worst {min(worst_any):.3f}x."]
    update_summary(summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = list(ms)
        series = {"SDPA 1 GPU": [ms[s]["sdpa_1gpu_cudnn"] for s in shapes],
                  "yunchang best": [best(ms[s], "yunchang") for s in shapes],
                  "sfattn best": [best(ms[s], "sfattn") for s in shapes]}
        fig, ax = plt.subplots(figsize=(8, 4.5))
        w = 0.8 / len(series)
        for i, (label, vals) in enumerate(series.items()):
            ax.bar([x + i * w for x in range(len(shapes))], vals, w, label=label)
        ax.set_xticks([x + w for x in range(len(shapes))], shapes)
        ax.set_yscale("log")
        ax.set_ylabel("ms per attention layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    return "\n".join(lines)


if __name__ == "__main__":
    print(main([Path(p) for p in sys.argv[1:]] or [Path("docs/perf/peers.json")]))
