"""Table and summary keys from ``layer_<mesh>.json`` files (bench_layer.py).

    python perf/report_layer.py docs/perf/layer_*.json --summary   # the table; keys into summary.json

The emulated-link keys (``torus_over_usp_emulated_best``, ``torus_over_best_baseline_emulated_min``)
come from the 2-virtual-machine runs with one rank per GPU only (``..._1gpu_...``: the same from 2
virtual machines sharing one GPU, bf16; ``fp8_wire_over_bf16_emulated_slowest``: Torus bf16 / fp8
at the slowest link run in both precisions, ``fp8_accurate_wire_...`` for precision='fp8-accurate'); runs with several ranks per GPU
(``meta.ranks_per_gpu`` > 1, e.g. 4 virtual machines on 2 GPUs) get their tables and
``layer_ms_*_rpgK_*`` keys, and are compared with the model by ``perf/model.py --calibrate``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRECISION_TAGS, update_summary  # noqa: E402

ALGOS = ["ulysses", "ring", "usp", "tas", "torus"]


def main(paths: list[Path], write: bool = False) -> str:
    lines, summary, shapes = [], {}, set()
    torus_gain, torus_vs_best = [], []  # emulated-link runs: USP / Torus, min(USP, TAS) / Torus
    shared: dict = {}  # mesh -> [(USP / Torus, best baseline / Torus)]: virtual machines sharing GPUs, bf16
    torus_ms: dict = {}  # (mesh, link, rpg, precision) -> {shape: Torus ms}, for the FP8 wire key
    for path in paths:
        data = json.loads(path.read_text())
        mesh = data["meta"]["mesh"]
        link = data["meta"].get("emulated_link")
        rpg = int(data["meta"].get("ranks_per_gpu") or 1)
        prec = data["meta"].get("precision", "bf16")
        tag = mesh + (f"_link{link.replace(',', '_')}" if link else "") + (f"_rpg{rpg}" if rpg > 1 else "") \
            + PRECISION_TAGS.get(prec, "_" + prec)
        title = f"Mesh {mesh}" + (f", emulated inter-machine link {link} (GB/s, us; a 64 MiB put measured "
                                  f"{data['meta']['emulated_put_GBps']:.1f} GB/s)" if link else "")
        title += f", {rpg} ranks per GPU (virtual machines sharing GPUs: not a real {mesh} run)" if rpg > 1 else ""
        title += f", precision={prec!r}" if prec != "bf16" else ""
        lines += [f"{title} ({data['meta']['ranks']} ranks on {data['meta']['gpus']} x {data['meta']['device']}); "
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
                    summary[f"layer_ms_{tag}_{shape}_{a}"] = round(row[a], 3)
            if link and "torus" in row:
                torus_ms.setdefault((mesh, link, rpg, prec), {})[shape] = row["torus"]
            if link and rpg == 1 and data["meta"]["mesh"] == "2x1" and prec == "bf16":
                torus_gain.append(row["usp"] / row["torus"])
                torus_vs_best.append(min(row["usp"], row["tas"]) / row["torus"])
            if link and rpg > 1 and prec == "bf16" and {"usp", "tas", "torus"} <= set(row):
                shared.setdefault(mesh, []).append((row["usp"] / row["torus"],
                                                    min(row["usp"], row["tas"]) / row["torus"]))
        lines.append("")
    summary["layer_bench_shapes"] = len(shapes)
    if torus_gain:
        summary["torus_over_usp_emulated_best"] = round(max(torus_gain), 3)
        summary["torus_over_best_baseline_emulated_min"] = round(min(torus_vs_best), 3)
        lines.append(f"Emulated links: Torus over USP at best {max(torus_gain):.3f}x; Torus over the faster of "
                     f"USP and TAS at worst {min(torus_vs_best):.3f}x.")
    for mesh, vals in shared.items():  # the 2x1 keys (the FP8 issue's study) carry no mesh suffix
        suffix, who = ("", "2 virtual machines sharing one GPU") if mesh == "2x1" else \
            (f"_{mesh}", f"mesh {mesh} of virtual machines sharing GPUs")
        gain, vs_best = max(v[0] for v in vals), min(v[1] for v in vals)
        summary[f"torus_over_usp_emulated_1gpu_best{suffix}"] = round(gain, 3)
        summary[f"torus_over_best_baseline_emulated_1gpu_min{suffix}"] = round(vs_best, 3)
        lines.append(f"Emulated links, {who}, bf16: Torus over USP at best {gain:.3f}x; over the faster of "
                     f"USP and TAS at worst {vs_best:.3f}x.")
    # FP8 on the wire: Torus in bf16 over Torus in FP8 (and in fp8-accurate) at each mesh's slowest emulated
    # link (GB/s) measured in both precisions; the key without a mesh is the worst over the meshes
    for low, key in (("fp8", "fp8"), ("fp8-accurate", "fp8_accurate")):
        pairs = sorted((mesh, float(link.split(",")[0]), link, rpg) for (mesh, link, rpg, prec) in torus_ms
                       if prec == low and (mesh, link, rpg, "bf16") in torus_ms)
        gains = {}
        for mesh in dict.fromkeys(m for m, *_ in pairs):
            _, _, link, rpg = min(p for p in pairs if p[0] == mesh)
            bf, f8 = torus_ms[mesh, link, rpg, "bf16"], torus_ms[mesh, link, rpg, low]
            gains[mesh] = min(bf[s] / f8[s] for s in bf if s in f8)
            summary[f"{key}_wire_over_bf16_emulated_slowest_{mesh}"] = round(gains[mesh], 3)
            lines.append(f"{low} on the wire (mesh {mesh}, link {link}, {rpg} ranks per GPU): Torus bf16 / {low} at "
                         f"worst over the shapes {gains[mesh]:.3f}x.")
        if gains:
            summary[f"{key}_wire_over_bf16_emulated_slowest"] = round(min(gains.values()), 3)
    if write:
        update_summary(summary)
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="layer_<mesh>.json files")
    ap.add_argument("--summary", action="store_true",
                    help="write the keys into docs/perf/summary.json (keys over several runs, e.g. the worst "
                         "link, come from the files given: give them all)")
    args = ap.parse_args()
    print(main(args.paths, write=args.summary))
