"""Table and summary keys from ``layer_<mesh>.json`` files (bench_layer.py).

    python perf/report_layer.py docs/perf/layer_1x2.json docs/perf/layer_2x1.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import update_summary  # noqa: E402

ALGOS = ["ulysses", "ring", "usp", "tas", "torus"]


def main(paths: list[Path]) -> str:
    lines, summary, shapes = [], {}, set()
    for path in paths:
        data = json.loads(path.read_text())
        mesh = data["meta"]["mesh"]
        lines += [f"Mesh {mesh} ({data['meta']['ranks']} ranks on {data['meta']['gpus']} x {data['meta']['device']}); "
                  f"`{data['meta']['command']}`", "",
                  "| shape | " + " | ".join(ALGOS) + " | SDPA cuDNN, 1 GPU | best speed-up over 1 GPU |",
                  "|---|" + "---|" * (len(ALGOS) + 2)]
        for shape, row in data["ms"].items():
            shapes.add(shape)
            best = min(row[a] for a in ALGOS if a in row)
            lines.append(f"| {shape} | " + " | ".join(f"{row[a]:.2f}" if a in row else "-" for a in ALGOS)
                         + f" | {row['sdpa_1gpu_cudnn']:.2f} | {row['sdpa_1gpu_cudnn'] / best:.2f}x |")
            for a in ALGOS:
                if a in row:
                    summary[f"layer_ms_{mesh}_{shape}_{a}"] = round(row[a], 3)
        lines.append("")
    summary["layer_bench_shapes"] = len(shapes)
    update_summary(summary)
    return "\n".join(lines)


if __name__ == "__main__":
    print(main([Path(p) for p in sys.argv[1:]]))
