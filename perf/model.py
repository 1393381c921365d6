"""Per-layer latency model of sfattn's schedules (ulysses, ring, usp, tas, torus); docs/model.md.

    python perf/model.py --calibrate docs/perf/layer_1x2.json docs/perf/layer_2x1.json --out docs/perf
    python perf/model.py --predict torus --machines 2 --gpus 1 --shape flux3072 --system h200_pair \\
        --inter-GBps 25                       # e.g. 2 virtual machines on 2 GPUs, link paced to 25 GB/s
    python perf/model.py --predict usp --machines 4 --gpus 1 --ranks-per-gpu 2 --inter-GBps 10 \\
        --from-calibration docs/perf/model_calibration.json   # 4 virtual machines on 2 GPUs

Degrees and placement come from ``sfattn.plan.make_plan`` (the same T x U x R plan the layer runs).
One rank's layer time is simulated step by step: layout copies, the Ulysses all-to-all (serial),
then the Torus and Ring transfers on their own lanes (one per stream) racing the compute steps
that wait for them, then Push O and the reverse all-to-all. ``Params.overlap=False`` puts every
transfer on the compute stream (the layer before commit 1dce222).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_plan():
    """sfattn.plan without sfattn/__init__ (which imports torch): the model runs on bare CPUs."""
    if "sfattn.plan" in sys.modules:
        return sys.modules["sfattn.plan"]
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("_sfattn_plan", ROOT / "sfattn" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_sfattn_plan"] = mod
    spec.loader.exec_module(mod)
    return mod


_plan = _load_plan()
ALGORITHMS: tuple[str, ...] = _plan.ALGORITHMS


@dataclass(frozen=True)
class Link:
    """A link class. ``GBps``: nominal bandwidth per direction (1e9 B/s), per GPU for the
    intra-machine link, per *machine* for the inter-machine link (its GPUs share it);
    ``efficiency``: achieved / nominal; ``latency_us``: fixed cost of each transfer."""

    GBps: float
    latency_us: float = 0.0
    efficiency: float = 1.0

    def seconds(self, nbytes: float, share: int = 1) -> float:
        """Time of one transfer of ``nbytes`` while ``share`` GPUs use the link at once."""
        if nbytes <= 0:
            return 0.0
        return nbytes * share / (self.GBps * 1e9 * self.efficiency) + self.latency_us * 1e-6


@dataclass(frozen=True)
class Params:
    """Everything the model assumes about one system (see docs/model.md for each default)."""

    tflops_d128: float           # attention kernel throughput at head_dim 128 (TFLOP/s)
    tflops_d64: float            # ... at head_dim 64 (other head_dims: linear between, clamped)
    intra: Link                  # NVLink / NVSwitch, per GPU
    inter: Link                  # NIC(s), per machine
    barrier_us: float = 0.0      # one barrier inside a machine; + 2 inter latencies across machines
    hbm_GBps: float = math.inf   # effective memory bandwidth of the pack/unpack layout copies
    fixed_ms: float = 0.0        # per-layer constant of any multi-GPU plan (launches, host gaps)
    overlap: bool = True         # False: every transfer on the compute stream (serial)
    ring_pipelined: bool = True  # False: one compute step per torus chunk after all ring pulls
    ranks_per_gpu: int = 1       # ranks time-sharing one GPU: kernel and layout-copy speed / this
    itemsize: int = 2            # bf16
    qkv_itemsize: float = 0.0    # bytes per Q/K/V element moved (0: itemsize; precision="fp8": 1, O stays)
    v_itemsize: float = 0.0      # ... of V if it differs (0: as Q/K; precision="fp8-accurate": itemsize)
    name: str = ""

    def tflops(self, head_dim: int) -> float:
        lo, hi = self.tflops_d64, self.tflops_d128
        x = min(max((head_dim - 64) / 64, 0.0), 1.0)
        return lo + (hi - lo) * x


@dataclass(frozen=True)
class Shape:
    seq_len: int
    heads: int
    head_dim: int
    batch: int = 1


SHAPES = {  # perf/bench_layer.py's shapes, plus a 40 s video (twice the latent frames)
    "flux3072": Shape(36864 + 512, 24, 128),
    "flux4096": Shape(65536 + 512, 24, 128),
    "video20s": Shape(41 * 4080 + 226, 24, 64),
    "video40s": Shape(82 * 4080 + 226, 24, 64),
}

# Our 2 x H200 pair (docs/perf/oneside.json: 256 MiB put 395 GB/s, ~4 us per small put; barrier
# 13.7 us). Kernel throughput: SDPA cuDNN rows of layer_*.json (calibrate() fits sfattn's kernel).
# The "inter" link of a 2x1 mesh is the same NVLink (two virtual machines).
H200_PAIR = Params(623.0, 416.0, Link(395.0, 4.0), Link(395.0, 4.0), barrier_us=13.7,
                   hbm_GBps=3000.0, name="2 x H200 (NVLink pair)")
# The paper's cluster: AWS p4d(e), 8 x A100-40GB, NVSwitch 300 GB/s per GPU per direction,
# 4 x 100 Gbps EFA = 400 Gbps = 50 GB/s per machine. FA2 bf16: 190 (d128) / 170 (d64) TFLOP/s.
A100_P4DE = Params(190.0, 170.0, Link(300.0, 5.0, 0.83), Link(50.0, 15.0, 0.8), barrier_us=15.0,
                   hbm_GBps=1200.0, name="8 x A100-40GB per machine, 400 Gbps EFA per machine")
# H200 cluster: 8 x H200, NVSwitch 450 GB/s per GPU per direction, 8 x 400 Gbps NICs per machine.
H200_CLUSTER = Params(623.0, 416.0, Link(450.0, 4.0, 0.83), Link(400.0, 10.0, 0.8), barrier_us=15.0,
                      hbm_GBps=3000.0, name="8 x H200 per machine, 8 x 400 Gbps per machine")
SYSTEMS = {"h200_pair": H200_PAIR, "a100_p4de": A100_P4DE, "h200_cluster": H200_CLUSTER}


def _check(algorithm: str, machines: int, gpus: int, shape: Shape, params: Params) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    for name, v in (("machines", machines), ("gpus", gpus), ("seq_len", shape.seq_len),
                    ("heads", shape.heads), ("head_dim", shape.head_dim), ("batch", shape.batch),
                    ("ranks_per_gpu", params.ranks_per_gpu)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive int")


def predict(algorithm: str, machines: int, gpus: int, shape: Shape | str, params: Params = H200_PAIR,
            ulysses_degree: int | None = None) -> dict:
    """Modelled latency of one attention layer on the slowest rank.

    Returns ``total_ms``, ``compute_ms``, ``exposed_comm_ms`` (transfers and barriers not hidden
    under compute), ``overhead_ms`` (layout copies + ``fixed_ms``), the degrees and the bytes one
    rank sends over each link class. Raises ValueError naming a bad argument.

    ``gpus`` counts ranks per (virtual) machine; with ``params.ranks_per_gpu = k`` every k of
    them time-share one physical GPU: compute and layout copies run at 1/k of the GPU's speed,
    while links are unchanged (an emulated link paces each transfer between virtual machines
    whether or not both ranks sit on the same GPU; see oneside/backends/nvshmem.py).
    """
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    _check(algorithm, machines, gpus, shape, params)
    mesh = _plan.Mesh(machines, gpus)
    plan = _plan.make_plan(mesh, shape.heads, shape.seq_len, shape.head_dim, algorithm, ulysses_degree)
    W, T, U, R, G = mesh.world_size, plan.T, plan.U, plan.R, gpus
    B, S, H, D = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    Sl = -(-S // W)
    L = B * Sl * H * D * params.itemsize                    # bytes of one tensor's local shard
    Lq = B * Sl * H * D * (params.qkv_itemsize or params.itemsize)  # ... of Q or K as moved
    Lv = B * Sl * H * D * (params.v_itemsize or params.qkv_itemsize or params.itemsize)  # ... of V
    rpg = params.ranks_per_gpu                              # ranks sharing this rank's GPU
    compute = 4 * B * Sl * S * H * D * rpg / (params.tflops(D) * 1e12)
    out = dict(algorithm=algorithm, machines=machines, gpus=gpus, T=T, U=U, R=R,
               compute_ms=compute * 1e3, total_ms=compute * 1e3, exposed_comm_ms=0.0, overhead_ms=0.0,
               intra_bytes=0.0, inter_bytes=0.0)
    if W == 1:
        return out

    def remote(level: str) -> list[bool]:  # rank 0's team peers in team order: on another machine?
        return [not mesh.same_machine(0, p) for p in plan.team(level, 0).ranks if p != 0]

    ux = sum(remote("u"))                            # Ulysses peers outside / inside the machine
    ui = U - 1 - ux
    ring_remote = remote("r")                        # rank 0 has r = 0: peers 1..R-1, pull order

    def xfer(nbytes: float, across: bool) -> float:  # the G GPUs of a machine share its NIC
        return params.inter.seconds(nbytes, G) if across else params.intra.seconds(nbytes)

    def a2a(nbytes: float) -> float:  # one ScatterPush; intra and inter pieces move concurrently
        return max(xfer(nbytes / U * ui, False), xfer(nbytes / U * ux, True))

    def barrier(across: bool) -> float:
        return (params.barrier_us + (2 * params.inter.latency_us if across else 0.0)) * 1e-6

    # transfers of the core: torus chunks (Q, K+V, O: L/T, 2L/T, L/T) and ring K+V per chunk
    q_x, kv_x, o_x = xfer(Lq / T, True), xfer((Lq + Lv) / T, True), xfer(L / T, True)
    ring_x = [xfer((Lq + Lv) / T, rm) for rm in ring_remote]
    step = compute / (T * T * R)                     # one Q chunk x one K/V block of one ring member

    if not params.overlap:  # the measured version: everything in program order on one stream
        core = (T - 1) * (q_x + kv_x + o_x) + T * sum(ring_x) + compute
    else:
        tor = 0.0                                    # torus lane (its own stream), inter link
        arr_q, arr_kv = [0.0], [0.0]
        for _ in range(1, T):
            tor += q_x
            arr_q.append(tor)
        for _ in range(1, T):
            tor += kv_x
            arr_kv.append(tor)
        ring_lane, arr_r = 0.0, []                   # ring lane: chunk i from peer j after kv_i
        for i in range(T):
            row = [0.0]                              # own block
            for dt in ring_x:
                ring_lane = max(ring_lane, arr_kv[i]) + dt
                row.append(ring_lane)
            if not params.ring_pipelined:
                row = [max(row)] * R
            arr_r.append(row)
        c = 0.0

        def run(ready: float, dur: float) -> None:
            nonlocal c
            c = max(c, ready) + dur

        for i in range(T):                           # Pull Q: chunk i vs the stationary K/V
            for j in range(R):
                run(max(arr_q[i], arr_r[0][j]), step)
        for k in range(1, T):                        # Pull KV: every Q chunk vs K/V chunk k
            rows = range(T) if k < T - 1 else [*range(1, T), 0]   # last: other machines' rows first
            for p in rows:
                for j in range(R):
                    run(max(arr_kv[k], arr_r[k][j]), step)
                if k == T - 1 and p != 0:            # Push O of rows p beside the rest
                    tor = max(tor, c) + o_x
        core = max(c, tor)

    layout = 8 * L * rpg / (params.hbm_GBps * 1e9)  # pack Q, K, V and unpack O: read + write
    ulysses = a2a(2 * Lq + Lv) + a2a(L) if U > 1 else 0.0
    barriers = 2 * barrier(machines > 1) + (barrier(ux > 0) if U > 1 else 0.0)
    overhead = layout + params.fixed_ms * 1e-3
    total = overhead + ulysses + barriers + core
    vol = {k: v * (2 * Lq + Lv + L) / (4 * L) if k != "ring" else v * (Lq + Lv) / (2 * L)
           for k, v in plan.comm_volume(B, params.itemsize).items()}  # Q, K (Lq), V (Lv) in, O out (L)
    inter = (2 * Lq + Lv + L) * ux / U + vol["torus"] + (Lq + Lv) * sum(ring_remote)
    out.update(total_ms=total * 1e3, overhead_ms=overhead * 1e3,
               exposed_comm_ms=(total - overhead - compute) * 1e3,
               intra_bytes=sum(vol.values()) - inter, inter_bytes=inter)
    return out


# -- calibration ---------------------------------------------------------------------------
def load_measurements(paths: list[str | Path]) -> list[dict]:
    """layer_<M>x<G>[_link..][_rpgK].json files -> points {machines, gpus, shape, algorithm, ms,
    inter, ranks_per_gpu} (SDPA rows too). ``ranks_per_gpu`` comes from the file's meta (1 when
    absent: the files from before it was recorded ran one rank per GPU)."""
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data.get("meta", {})
        try:
            M, G = (int(x) for x in meta["mesh"].split("x"))
        except (KeyError, ValueError):
            raise ValueError(f"{path}: meta.mesh missing or not 'MxG' (not a bench_layer.py result?)") from None
        link = meta.get("emulated_link")  # "GBPS,LATENCY_US" of a paced inter-machine link
        inter = tuple(float(x) for x in link.split(",")) if link else None
        prec = meta.get("precision", "bf16")
        qkv, v = {"fp8": (1.0, 0.0), "fp8-accurate": (1.0, 2.0)}.get(prec, (0.0, 0.0))  # bf16 / fp16 layers
        rpg = meta.get("ranks_per_gpu")
        rpg = 1 if rpg is None else rpg
        if not isinstance(rpg, int) or rpg < 1:
            raise ValueError(f"{path}: meta.ranks_per_gpu={rpg}: expected >= 1")
        for shape, row in data["ms"].items():
            if shape not in SHAPES:
                raise ValueError(f"{path}: shape {shape!r} is not one of the model's {sorted(SHAPES)}")
            for algo, ms in row.items():
                points.append(dict(machines=M, gpus=G, shape=shape, algorithm=algo, ms=float(ms), inter=inter,
                                   ranks_per_gpu=rpg, qkv_itemsize=qkv, v_itemsize=v))
    return points


def _at(point: dict, params: Params) -> Params:
    """The parameters a measured point ran under (its emulated inter-machine link and its ranks
    per GPU, if any)."""
    inter, rpg = point.get("inter"), point.get("ranks_per_gpu", 1)
    if inter:
        params = replace(params, inter=Link(inter[0], inter[1] if len(inter) > 1 else 0.0))
    sizes = point.get("qkv_itemsize", 0.0), point.get("v_itemsize", 0.0)
    if sizes != (params.qkv_itemsize, params.v_itemsize):
        params = replace(params, qkv_itemsize=sizes[0], v_itemsize=sizes[1])
    return params if rpg == params.ranks_per_gpu else replace(params, ranks_per_gpu=rpg)


def _mesh_label(point: dict) -> str:
    link = f" link {point['inter'][0]:g} GB/s" if point.get("inter") else ""
    rpg = point.get("ranks_per_gpu", 1)
    return f"{point['machines']}x{point['gpus']}{link}" + (f" ({rpg} ranks/GPU)" if rpg > 1 else "")


def calibrate(points: list[dict], base: Params, iters: int = 50) -> Params:
    """Fit ``tflops_d128``, ``tflops_d64`` (those the points cover) and ``fixed_ms`` to measured
    layer times, minimising the squared *relative* error; links and the rest stay as in ``base``.

    Time is linear in 1/tflops and fixed_ms except through overlap, so a linear least-squares
    fit is repeated with the non-compute part re-evaluated until it settles.
    """
    import numpy as np

    pts = [p for p in points if p["algorithm"] in ALGORITHMS]
    if not pts:
        raise ValueError("points: no measurement of a modelled algorithm")
    dims = sorted({SHAPES[p["shape"]].head_dim for p in pts})
    if not set(dims) <= {64, 128}:
        raise ValueError(f"points: head_dims {dims}; calibration fits head_dim 64 and 128 only")
    params = base
    for _ in range(iters):
        rows, rhs = [], []
        for p in pts:
            r = predict(p["algorithm"], p["machines"], p["gpus"], p["shape"], _at(p, params))
            other = r["total_ms"] - r["compute_ms"] - params.fixed_ms * (p["machines"] * p["gpus"] > 1)
            gflop = r["compute_ms"] * params.tflops(SHAPES[p["shape"]].head_dim)  # = FLOPs / 1e9
            y = p["ms"]
            rows.append([gflop / y * (d == SHAPES[p["shape"]].head_dim) for d in dims]
                        + [float(p["machines"] * p["gpus"] > 1) / y])
            rhs.append(1.0 - other / y)
        A, b = np.array(rows), np.array(rhs)
        x = np.linalg.lstsq(A, b, rcond=None)[0]
        if x[-1] < 0:  # no negative constant: refit without it
            x = np.append(np.linalg.lstsq(A[:, :-1], b, rcond=None)[0], 0.0)
        fit = {f"tflops_d{d}": 1.0 / x[i] for i, d in enumerate(dims)}  # ms per GFLOP -> TFLOP/s
        new = replace(params, fixed_ms=float(x[-1]), **{k: float(v) for k, v in fit.items()})
        done = all(abs(getattr(new, k) - getattr(params, k)) <= 1e-9 * abs(getattr(new, k)) + 1e-12
                   for k in ("tflops_d128", "tflops_d64", "fixed_ms"))
        params = new
        if done:
            break
    return params


def calibration_table(points: list[dict], params: Params) -> list[dict]:
    rows = []
    for p in points:
        if p["algorithm"] not in ALGORITHMS:
            continue
        m = predict(p["algorithm"], p["machines"], p["gpus"], p["shape"], _at(p, params))["total_ms"]
        rows.append(dict(mesh=_mesh_label(p), shape=p["shape"], algorithm=p["algorithm"],
                         measured_ms=round(p["ms"], 3), model_ms=round(m, 3),
                         rel_error=round((m - p["ms"]) / p["ms"], 4)))
    return rows


# -- predictions ---------------------------------------------------------------------------
# Emulated links of scripts/gpu_peers.sh (GB/s, latency 10 us): 2 virtual machines on 2 GPUs at the
# model's largest Torus gains over USP (flux3072 peaks at 15, flux4096 at 8 GB/s), and 4 virtual
# machines on 2 GPUs (2 ranks per GPU) where the USP / TAS / Torus ordering changes.
VM2_LINKS = (15.0, 10.0, 8.0)
VM4_LINKS = (40.0, 20.0, 10.0)
EMULATED_LATENCY_US = 10.0
ORDER_ALGOS = ("usp", "tas", "torus")
ORDER_MARGIN = 0.05  # pairs the model puts closer than this are ties: not compared


def ordering(times: dict[str, float], margin: float = ORDER_MARGIN) -> str:
    """``'torus < usp < tas'``-style ordering of ORDER_ALGOS, ``~`` joining neighbours within ``margin``."""
    names = sorted(ORDER_ALGOS, key=times.get)
    out = names[0]
    for a, b in zip(names, names[1:]):
        out += (" ~ " if times[b] <= times[a] * (1 + margin) else " < ") + b
    return out


def order_check(points: list[dict], params: Params, margin: float = ORDER_MARGIN) -> dict:
    """Measured vs modelled ordering of USP / TAS / Torus for each (mesh, link, ranks per GPU,
    shape) that measured all three; a pair counts only where the model separates it by > margin."""
    sets: dict[tuple, dict[str, dict]] = {}
    for p in points:
        if p["algorithm"] in ORDER_ALGOS:
            key = (p["machines"], p["gpus"], p.get("inter"), p.get("ranks_per_gpu", 1), p["shape"])
            sets.setdefault(key, {})[p["algorithm"]] = p
    rows, matched, total = [], 0, 0
    for key, got in sets.items():
        if set(got) != set(ORDER_ALGOS):
            continue
        meas = {a: got[a]["ms"] for a in ORDER_ALGOS}
        model = {a: predict(a, got[a]["machines"], got[a]["gpus"], got[a]["shape"], _at(got[a], params))["total_ms"]
                 for a in ORDER_ALGOS}
        ok = n = 0
        for i, a in enumerate(ORDER_ALGOS):
            for b in ORDER_ALGOS[i + 1:]:
                if abs(model[a] / model[b] - 1) > margin:
                    n += 1
                    ok += (model[a] < model[b]) == (meas[a] < meas[b])
        matched, total = matched + ok, total + n
        rows.append(dict(mesh=_mesh_label(got["usp"]), shape=key[-1], measured=ordering(meas, margin),
                         model=ordering(model, margin), pairs_matched=ok, pairs_compared=n))
    return dict(rows=rows, pairs_matched=matched, pairs_compared=total)


def emulated_prediction(params: Params, machines: int, ranks_per_gpu: int, links: tuple[float, ...],
                        shapes: tuple[str, ...] = ("flux3072", "flux4096")) -> list[dict]:
    """USP / TAS / Torus (and the rest) on ``machines`` virtual machines of one rank each, links
    paced to each of ``links`` GB/s (latency EMULATED_LATENCY_US), ``ranks_per_gpu`` per GPU."""
    rows = []
    for x in links:
        p = replace(params, inter=Link(x, EMULATED_LATENCY_US), ranks_per_gpu=ranks_per_gpu)
        for s in shapes:
            ms = {a: round(predict(a, machines, 1, s, p)["total_ms"], 3) for a in ALGORITHMS}
            rows.append(dict(inter_GBps=x, shape=s, **ms, order=ordering(ms),
                             torus_over_usp=round(ms["usp"] / ms["torus"], 3),
                             torus_over_best_baseline=round(min(ms["usp"], ms["tas"]) / ms["torus"], 3)))
    return rows


PAPER = {"tas_over_usp_avg_beyond_2": 1.27, "tas_over_usp_max": 1.64,
         "torus_over_usp_avg": 1.35, "torus_over_usp_max": 1.77}


def speedups(params: Params, shapes: list[str], machines: list[int], gpus: int = 8) -> list[dict]:
    rows = []
    for s in shapes:
        for M in machines:
            ms = {a: predict(a, M, gpus, s, params) for a in ("usp", "tas", "torus")}
            usp_serial = predict("usp", M, gpus, s, replace(params, overlap=False))["total_ms"]
            rows.append(dict(shape=s, machines=M, **{f"{a}_ms": round(r["total_ms"], 3) for a, r in ms.items()},
                             usp_serial_ms=round(usp_serial, 3),
                             tas_over_usp_serial=round(usp_serial / ms["tas"]["total_ms"], 3),
                             torus_over_usp_serial=round(usp_serial / ms["torus"]["total_ms"], 3),
                             **{f"{a}_exposed_comm_ms": round(r["exposed_comm_ms"], 3) for a, r in ms.items()},
                             tas_over_usp=round(ms["usp"]["total_ms"] / ms["tas"]["total_ms"], 3),
                             torus_over_usp=round(ms["usp"]["total_ms"] / ms["torus"]["total_ms"], 3),
                             degrees={a: f"T{r['T']} U{r['U']} R{r['R']}" for a, r in ms.items()}))
    return rows


def aggregate(rows: list[dict]) -> dict:
    out = {}
    for a in ("tas", "torus", "tas_over_usp_serial", "torus_over_usp_serial"):
        for name, sel in (("beyond_2", [r for r in rows if r["machines"] > 2]),
                          ("2_and_more", [r for r in rows if r["machines"] >= 2]),
                          ("at_2", [r for r in rows if r["machines"] == 2])):
            key = a if "_over_" in a else f"{a}_over_usp"
            v = [r[key] for r in sel]
            if v:
                out[f"{key}_avg_{name}"] = round(sum(v) / len(v), 3)
                out[f"{key}_max_{name}"] = round(max(v), 3)
                out[f"{key}_min_{name}"] = round(min(v), 3)
    return out


def plot(pred: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(pred["systems"])
    fig, axes = plt.subplots(len(systems), 1, figsize=(13, 4.2 * len(systems)), squeeze=False)
    for ax, key in zip(axes[:, 0], systems):
        rows = [r for r in pred["systems"][key]["speedups"] if r["machines"] > 1]
        agg = pred["systems"][key]["aggregate"]
        labels = [f"{r['shape']}\n{r['machines']} mach." for r in rows] + ["avg\n>2 mach.", "max\nall"]
        tas = [r["tas_over_usp"] for r in rows] + [agg["tas_over_usp_avg_beyond_2"], agg["tas_over_usp_max_2_and_more"]]
        tor = [r["torus_over_usp"] for r in rows] + [agg["torus_over_usp_avg_beyond_2"],
                                                     agg["torus_over_usp_max_2_and_more"]]
        x = range(len(labels))
        w = 0.2
        ax.bar([i - 1.5 * w for i in x], tas, w, label="TAS / USP (model)", color="tab:blue")
        ax.bar([i - 0.5 * w for i in x], tor, w, label="Torus / USP (model)", color="tab:orange")
        ser = [(r["tas_over_usp_serial"], r["torus_over_usp_serial"]) for r in rows] + [
            (agg[f"{a}_over_usp_serial_avg_beyond_2"], agg[f"{a}_over_usp_serial_max_2_and_more"]) for a in ("tas", "torus")]
        ser[-2:] = [(ser[-2][0], ser[-1][0]), (ser[-2][1], ser[-1][1])]  # avg row, max row
        ax.scatter([i - 1.5 * w for i in x], [a for a, _ in ser], marker="_", s=120, color="k", zorder=3,
                   label="same, over USP with its ring not overlapped")
        ax.scatter([i - 0.5 * w for i in x], [b for _, b in ser], marker="_", s=120, color="k", zorder=3)
        n = len(rows)
        ax.bar([n + 0.5 * w, n + 1 + 0.5 * w], [PAPER["tas_over_usp_avg_beyond_2"], PAPER["tas_over_usp_max"]], w,
               label="TAS / USP (paper)", color="tab:blue", alpha=0.45, hatch="//")
        ax.bar([n + 1.5 * w, n + 1 + 1.5 * w], [PAPER["torus_over_usp_avg"], PAPER["torus_over_usp_max"]], w,
               label="StreamFusion / USP (paper)", color="tab:orange", alpha=0.45, hatch="//")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("speed-up over USP (layer)")
        ax.set_title(pred["systems"][key]["params"]["name"] + " - paper bars: its aggregates (no per-shape numbers)")
        ax.legend(fontsize=7, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(calib: dict, pred: dict) -> str:
    """The tables of docs/model.md."""
    f = lambda v: f"{v:.2f}"  # noqa: E731
    out = ["### Calibration (measured vs modelled)", "",
           "| mesh | shape | algorithm | measured ms | model ms | rel. error |", "|---|---|---|---|---|---|"]
    out += [f"| {r['mesh']} | {r['shape']} | {r['algorithm']} | {f(r['measured_ms'])} | {f(r['model_ms'])} | "
            f"{100 * r['rel_error']:+.1f} % |" for r in calib["table"]]
    for key, sy in pred["systems"].items():
        out += ["", f"### {sy['params']['name']} ({key})", "",
                "| shape | machines | degrees USP / TAS / Torus | USP ms | TAS ms | Torus ms | TAS/USP | Torus/USP "
                "| USP ms, ring not overlapped | TAS / that | Torus / that |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sy["speedups"]:
            d = r["degrees"]
            out.append(f"| {r['shape']} | {r['machines']} | {d['usp']} / {d['tas']} / {d['torus']} | {f(r['usp_ms'])} | "
                       f"{f(r['tas_ms'])} | {f(r['torus_ms'])} | {f(r['tas_over_usp'])} | {f(r['torus_over_usp'])} | "
                       f"{f(r['usp_serial_ms'])} | {f(r['tas_over_usp_serial'])} | {f(r['torus_over_usp_serial'])} |")
        out += ["", "Sensitivity to the inter-machine bandwidth (same aggregates, USP ring overlapped):", "",
                "| inter GB/s per machine (nominal) | TAS/USP avg >2 | TAS/USP max | Torus/USP avg >2 | Torus/USP max "
                "| TAS/USP avg at 2 | Torus/USP avg at 2 |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['inter_GBps_per_machine']:g} | {f(r['tas_over_usp_avg_beyond_2'])} | "
                f"{f(r['tas_over_usp_max_2_and_more'])} | {f(r['torus_over_usp_avg_beyond_2'])} | "
                f"{f(r['torus_over_usp_max_2_and_more'])} | {f(r['tas_over_usp_avg_at_2'])} | "
                f"{f(r['torus_over_usp_avg_at_2'])} |" for r in sy["inter_bandwidth_sensitivity"]]
    algos = list(ALGORITHMS)
    out += ["", "### The layer on our pair: serial (before commit 1dce222) vs overlapped (as measured)", "",
            "| mesh | shape | " + " | ".join(algos) + " |", "|---|---|" + "---|" * len(algos)]
    rows: dict = {}
    for r in pred["h200_pair_current_layer"]:
        rows.setdefault((r["mesh"], r["shape"]), {})[r["algorithm"]] = r
    out += [f"| {m} | {s} | " + " | ".join(f"{f(d[a]['serial_ms'])} / {f(d[a]['overlapped_ms'])}" for a in algos) + " |"
            for (m, s), d in rows.items()]
    cols = algos + ["ring_ring_pipelined", "usp_ring_pipelined"]
    out += ["", "### 2 virtual machines on 2 H200, inter link paced (current layer, fitted kernel)", "",
            "| inter GB/s | shape | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    out += [f"| {r['inter_GBps']:g} | {r['shape']} | " + " | ".join(f(r[a]) for a in cols) + " |"
            for r in pred["emulated_2x1_paced"]]
    em = pred["emulated_gpu_peers"]
    for key, title in (("vm2", "2 virtual machines on 2 GPUs"), ("vm4_rpg2", "4 virtual machines on 2 GPUs "
                                                                             "(2 ranks per GPU)")):
        out += ["", f"### Prediction for scripts/gpu_peers.sh: {title}, links paced (latency "
                    f"{em['latency_us']:g} us)", "", "| inter GB/s | shape | " + " | ".join(algos)
                + " | ordering (~: within 5 %) | Torus / USP | Torus / min(USP, TAS) |", "|---|---|" + "---|" * (len(algos) + 3)]
        out += [f"| {r['inter_GBps']:g} | {r['shape']} | " + " | ".join(f(r[a]) for a in algos)
                + f" | {r['order']} | {r['torus_over_usp']:.3f} | {r['torus_over_best_baseline']:.3f} |" for r in em[key]]
    if calib.get("order_check", {}).get("rows"):
        oc = calib["order_check"]
        out += ["", "### Ordering of USP / TAS / Torus: measured vs model", "",
                "| mesh | shape | measured | model | pairs matched |", "|---|---|---|---|---|"]
        out += [f"| {r['mesh']} | {r['shape']} | {r['measured']} | {r['model']} | {r['pairs_matched']} / "
                f"{r['pairs_compared']} |" for r in oc["rows"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", nargs="*", metavar="LAYER_JSON", help="measured layer_<M>x<G>.json files")
    ap.add_argument("--out", default=None, help="write model_calibration.json, model_predictions.json, "
                                                "model_speedups.png here (and summary keys)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/model.md")
    ap.add_argument("--check", nargs="*", metavar="LAYER_JSON", help="measured layer files: the model's error "
                    "on them with --from-calibration's params, and refitted to them")
    ap.add_argument("--predict", metavar="ALGORITHM", help="print one prediction")
    ap.add_argument("--machines", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--shape", default="flux3072", choices=list(SHAPES))
    ap.add_argument("--system", default="h200_pair", choices=list(SYSTEMS))
    ap.add_argument("--inter-GBps", type=float, help="override the inter-machine link (GB/s per machine)")
    ap.add_argument("--inter-latency-us", type=float)
    ap.add_argument("--intra-GBps", type=float)
    ap.add_argument("--tflops", type=float, nargs=2, metavar=("D128", "D64"))
    ap.add_argument("--ranks-per-gpu", type=int, default=1, metavar="K",
                    help="ranks time-sharing one GPU (e.g. 4 virtual machines on 2 GPUs: --machines 4 "
                         "--gpus 1 --ranks-per-gpu 2); compute and layout copies run at 1/K speed")
    ap.add_argument("--serial", action="store_true", help="no overlap (communication on the compute stream)")
    ap.add_argument("--from-calibration", metavar="JSON", help="start from the fitted params of a "
                    "model_calibration.json (our kernel's throughput) instead of --system")
    ap.add_argument("--ring-pipelined", action="store_true", help="one compute step per ring peer "
                    "(the design) instead of the current layer's one step after all ring pulls")
    args = ap.parse_args(argv)

    if args.check:
        d = json.loads(Path(args.from_calibration or ROOT / "docs/perf/model_calibration.json").read_text())
        p = Params(**{**d["params_fitted"], "intra": Link(**d["params_fitted"]["intra"]),
                      "inter": Link(**d["params_fitted"]["inter"])})
        print(json.dumps(check(load_measurements(args.check), p), indent=1))
        return
    if args.predict:
        p = SYSTEMS[args.system]
        if args.from_calibration:
            d = json.loads(Path(args.from_calibration).read_text())["params_fitted"]
            p = Params(**{**d, "intra": Link(**d["intra"]), "inter": Link(**d["inter"])})
        p = replace(p, ring_pipelined=args.ring_pipelined or (p.ring_pipelined and not args.from_calibration))
        if args.inter_GBps or args.inter_latency_us is not None:
            p = replace(p, inter=replace(p.inter, GBps=args.inter_GBps or p.inter.GBps,
                                         latency_us=p.inter.latency_us if args.inter_latency_us is None
                                         else args.inter_latency_us))
        if args.intra_GBps:
            p = replace(p, intra=replace(p.intra, GBps=args.intra_GBps))
        if args.tflops:
            p = replace(p, tflops_d128=args.tflops[0], tflops_d64=args.tflops[1])
        p = replace(p, overlap=not args.serial, ranks_per_gpu=args.ranks_per_gpu)
        try:
            print(json.dumps(predict(args.predict, args.machines, args.gpus, args.shape, p), indent=1))
        except ValueError as e:
            ap.error(str(e))
        return
    if args.calibrate is None:
        ap.error("give --predict ALGORITHM or --calibrate LAYER_JSON...")
    res = run_all(args.calibrate, Path(args.out) if args.out else None)
    if args.markdown:
        print(markdown(res["calibration"], res["predictions"]))


def check(points: list[dict], params: Params) -> dict:
    """The model against measured points: with ``params`` as they are, and refitted to the points
    (kernel throughputs and the fixed cost; see :func:`calibrate`). Points of ``precision="fp8"``
    layers move Q/K/V at one byte per element (``"fp8-accurate"``: Q/K at one, V at two); fit each
    precision apart (another kernel)."""
    if len({(p.get("qkv_itemsize", 0.0), p.get("v_itemsize", 0.0)) for p in points}) > 1:
        raise ValueError("points: layers of several precisions mixed; check each precision on its own "
                         "(their kernels differ)")
    fitted = calibrate(points, params)
    as_is, refit = calibration_table(points, params), calibration_table(points, fitted)
    return dict(max_rel_error=round(max(abs(r["rel_error"]) for r in as_is), 4),
                max_rel_error_refit=round(max(abs(r["rel_error"]) for r in refit), 4),
                refit={k: round(getattr(fitted, k), 4) for k in ("tflops_d128", "tflops_d64", "fixed_ms")},
                table=[dict(r, refit_ms=f["model_ms"], refit_rel_error=f["rel_error"]) for r, f in zip(as_is, refit)])


def order_summary(check: dict) -> dict:
    """Summary keys of the 4-virtual-machine (2 ranks per GPU) ordering check, if measured."""
    rows = [r for r in check["rows"] if "ranks/GPU" in r["mesh"]]
    if not rows:
        return {}
    ok, n = sum(r["pairs_matched"] for r in rows), sum(r["pairs_compared"] for r in rows)
    return {"model_emulated_rpg_order_pairs_matched": ok, "model_emulated_rpg_order_pairs_compared": n}


def run_all(paths: list[str], out: Path | None) -> dict:
    """Calibrate on our measurements, predict the paper's and an H200 cluster, write the results."""
    points = load_measurements(paths)
    sdpa = [p for p in points if p["algorithm"] == "sdpa_1gpu_cudnn" and p["ranks_per_gpu"] == 1]
    cudnn = {}
    for d in (128, 64):
        v = [4 * SHAPES[p["shape"]].seq_len ** 2 * SHAPES[p["shape"]].heads * d / (p["ms"] * 1e9)
             for p in sdpa if SHAPES[p["shape"]].head_dim == d]
        if v:
            cudnn[d] = sum(v) / len(v)
    # the measured layer (commit d395eaf on): two streams, ring K/V attended peer by peer
    base = replace(H200_PAIR, overlap=True, ring_pipelined=True,
                   tflops_d128=cudnn.get(128, H200_PAIR.tflops_d128), tflops_d64=cudnn.get(64, H200_PAIR.tflops_d64))
    table_cudnn = calibration_table(points, base)
    fitted = calibrate(points, base)
    table = calibration_table(points, fitted)
    max_err = max(abs(r["rel_error"]) for r in table)
    calib = dict(measurements=paths, cudnn_tflops_from_sdpa_rows={f"d{k}": round(v, 1) for k, v in cudnn.items()},
                 params_fitted=asdict(fitted), model_max_rel_error=round(max_err, 4),
                 model_max_rel_error_with_cudnn_throughput=round(max(abs(r["rel_error"]) for r in table_cudnn), 4),
                 table=table)
    # what the current (two-stream) layer should measure on the same pair
    now = fitted  # the layer as measured: overlapped, ring peer by peer
    serial = replace(fitted, overlap=False, ring_pipelined=False)  # the layer before commit 1dce222
    pair_now = [dict(mesh=f"{M}x{G}", shape=s, algorithm=a, serial_ms=round(predict(a, M, G, s, serial)["total_ms"], 3),
                     overlapped_ms=round(predict(a, M, G, s, now)["total_ms"], 3))
                for M, G in ((1, 2), (2, 1)) for s in ("flux3072", "flux4096", "video20s") for a in ALGORITHMS]
    # emulated slow link: 2 virtual machines on 2 GPUs, inter link paced to X GB/s
    def paced_row(x: float, s: str) -> dict:
        p = replace(now, inter=Link(x, 4.0))
        row = {a: round(predict(a, 2, 1, s, p)["total_ms"], 3) for a in ALGORITHMS}
        row.update({f"{a}_ring_pipelined": round(predict(a, 2, 1, s, replace(p, ring_pipelined=True))["total_ms"], 3)
                    for a in ("ring", "usp")})
        return dict(inter_GBps=x, shape=s, **row)

    paced = [paced_row(x, s) for x in (395.0, 100.0, 50.0, 25.0, 12.5, 6.25) for s in ("flux3072", "flux4096", "video20s")]
    emulated = dict(latency_us=EMULATED_LATENCY_US, margin=ORDER_MARGIN,
                    vm2=emulated_prediction(now, 2, 1, VM2_LINKS), vm4_rpg2=emulated_prediction(now, 4, 2, VM4_LINKS))
    calib["order_check"] = order_check(points, fitted)
    shapes, machines = ["flux3072", "flux4096", "video20s", "video40s"], [1, 2, 3, 4]
    systems = {}
    for key in ("a100_p4de", "h200_cluster"):
        rows = speedups(SYSTEMS[key], shapes, machines)
        sens = []  # how the averages move with the inter-machine bandwidth
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            p = replace(SYSTEMS[key], inter=replace(SYSTEMS[key].inter, GBps=SYSTEMS[key].inter.GBps * f))
            a = aggregate(speedups(p, shapes, machines))
            sens.append(dict(inter_GBps_per_machine=p.inter.GBps, **{k: a[k] for k in (
                "tas_over_usp_avg_beyond_2", "tas_over_usp_max_2_and_more", "torus_over_usp_avg_beyond_2",
                "torus_over_usp_max_2_and_more", "tas_over_usp_avg_at_2", "torus_over_usp_avg_at_2")}))
        systems[key] = dict(params=asdict(SYSTEMS[key]), speedups=rows, aggregate=aggregate(rows),
                            inter_bandwidth_sensitivity=sens)
    pred = dict(paper=PAPER, systems=systems, h200_pair_current_layer=pair_now, emulated_2x1_paced=paced,
                emulated_gpu_peers=emulated,
                note="layer latency (attention only), batch 1; speed-up = USP time / algorithm time")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_calibration.json").write_text(json.dumps(calib, indent=1) + "\n")
        (out / "model_predictions.json").write_text(json.dumps(pred, indent=1) + "\n")
        plot(pred, out / "model_speedups.png")
        sys.path.insert(0, str(ROOT / "perf"))
        from common import update_summary

        a, h = systems["a100_p4de"]["aggregate"], systems["h200_cluster"]["aggregate"]
        update_summary({"model_max_rel_error": round(max_err, 4),
                        "model_fitted_tflops_d128": round(fitted.tflops_d128, 1),
                        "model_fitted_tflops_d64": round(fitted.tflops_d64, 1),
                        "model_a100_tas_over_usp_avg_beyond_2": a["tas_over_usp_avg_beyond_2"],
                        "model_a100_torus_over_usp_avg_beyond_2": a["torus_over_usp_avg_beyond_2"],
                        "model_a100_torus_over_usp_max": a["torus_over_usp_max_2_and_more"],
                        "model_h200_torus_over_usp_avg_beyond_2": h["torus_over_usp_avg_beyond_2"],
                        **order_summary(calib["order_check"])},
                       out / "summary.json")
    print(json.dumps(dict(fitted={k: v for k, v in asdict(fitted).items() if k in ("tflops_d128", "tflops_d64", "fixed_ms")},
                          cudnn=calib["cudnn_tflops_from_sdpa_rows"], model_max_rel_error=max_err,
                          with_cudnn=calib["model_max_rel_error_with_cudnn_throughput"],
                          a100=systems["a100_p4de"]["aggregate"], h200=systems["h200_cluster"]["aggregate"]), indent=1))
    return dict(calibration=calib, predictions=pred)


if __name__ == "__main__":
    main()
