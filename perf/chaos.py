"""Chaos harness: thousands of layer calls under random delays, and injected faults.

    # soak: every algorithm on every mesh, ONESIDE_CHAOS delays, outputs checked bitwise and vs float64
    python perf/chaos.py soak --calls 25000 --meshes 3x1 1x3 2x1 2x2
    # faults: one injected fault per run (a rank killed / raising and going on / skipping a call)
    python perf/chaos.py faults --runs 200
    # both, then the summary keys (docs/perf/summary.json) and docs/perf/chaos.json
    python perf/chaos.py all --calls 25000 --runs 200 --write
    # GPUs (ranks sharing one GPU under MPS): --backend nvshmem --dtype bfloat16
    # FP8 layers (SPAttention(precision="fp8"); the float64 emulation of the FP8 kernel on CPUs)
    python perf/chaos.py all --calls 2000 --runs 40 --precision fp8
    # io buffers (SPAttention(io_buffers=True), called on its io tensors: Ulysses over ranks of
    # one GPU/host computes in place, reading and writing the members' heaps between two barriers)
    python perf/chaos.py all --calls 2000 --runs 40 --meshes 1x2 1x3 2x2 --io

A run starts ``python -m oneside.launch`` with a long ``--grace``, so a rank that neither
finishes nor raises is found hung (and then killed) by this harness, not by the launcher.
Each rank writes a JSON report: layer calls, outputs that differ bitwise from the first
output for the same inputs, the worst relative error vs a float64 reference, and the error
it ended with. A fault run passes ("detected") when every rank that was not killed ended
with a oneside error other than the injected one, no rank returned a wrong output, and
every process exited within the deadline.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"float64": [(2, 61, 6, 16), (1, 37, 6, 8)], "bfloat16": [(2, 1031, 6, 64), (1, 389, 6, 64)]}
TOL = {"float64": 1e-10, "bfloat16": 2e-2}
TOL_FP8 = 0.15  # precision="fp8"/"fp8-accurate": largest error vs float64 relative to the largest output
                # (measured ~0.05 / ~0.02)
# fault sites and their weights; 'skip': a rank skips one layer call (raises and catches between
# building and calling), 'heap': every rank's heap is too small, 'absent': a rank never starts
SITES_W = {"barrier": 4, "transfer": 3, "signal": 2, "wait": 2, "launch": 2, "alloc": 1, "init": 1, "skip": 3,
           "heap": 1, "absent": 1}


# ------------------------------------------------------------------------------------------
# worker: one rank (run under oneside.launch)
# ------------------------------------------------------------------------------------------
def _cases(rt, dtype: str, precision: str | None = None, io: bool = False):
    """(name, layer, [(shard inputs, reference rows)]) for every algorithm the mesh allows;
    the largest shape first (a cold start's first call is the largest)."""
    import sfattn
    from sfattn.reference import attention_ref

    cases = []
    for si, (B, S, H, D) in enumerate(SHAPES[dtype]):
        for algo in sfattn.ALGORITHMS:
            try:
                plan = sfattn.make_plan(rt.mesh, H, S, D, algo)
            except sfattn.PlanError:
                continue
            layer = sfattn.SPAttention(rt, plan, B, dtype, local="kernel", precision=precision, io_buffers=io)
            lo, L = rt.rank * layer.Sl, layer.shard_len()
            sets = []
            for k in range(2):  # two input sets per layer, the same on every rank
                rng = np.random.default_rng(1000 * si + 10 * k + sfattn.ALGORITHMS.index(algo))
                full = [rng.standard_normal((B, S, H, D)) for _ in range(3)]
                if dtype == "bfloat16":
                    import torch

                    full = [torch.from_numpy(x).to(torch.bfloat16) for x in full]
                    ref = attention_ref(*(x.double().numpy() for x in full), layer.scale)[0]
                    shard = [x[:, lo:lo + L].contiguous().cuda() for x in full]
                else:
                    ref = attention_ref(*full, layer.scale)[0]
                    shard = [np.ascontiguousarray(x[:, lo:lo + L]) for x in full]
                if io:  # copied into the layer's io tensors per call: torch tensors, made here once
                    import torch

                    shard = [torch.as_tensor(x) for x in shard]
                sets.append((shard, ref[:, lo:lo + L], float(np.abs(ref).max())))
            cases.append((f"{algo}/S{S}", layer, sets))
    return cases


def worker(a: argparse.Namespace) -> int:
    import oneside

    rep = {"rank": int(os.environ.get("RANK", 0)), "calls": 0, "mismatches": 0, "wrong": 0, "max_rel": 0.0,
           "error": None, "message": "", "injected": 0}
    out = Path(a.report) / f"rank{rep['rank']}.json"
    skip = tuple(int(x) for x in a.skip.split(":")) if a.skip else None  # (rank, call): skip that call
    if a.absent is not None and rep["rank"] == a.absent:
        rep["error"] = "absent"
        out.write_text(json.dumps(rep))
        return 0  # never joins

    def save():
        out.write_text(json.dumps(rep))

    t0 = time.monotonic()
    code = 0
    rt = None
    try:
        try:
            rt = oneside.init(heap_size=a.heap)
        except oneside.InjectedFault:  # a fault at init: this rank cannot go on
            rep["injected"] += 1
            raise
        cases = None
        first: dict = {}
        i = 0
        while i < a.calls:
            try:
                if cases is None:
                    cases = _cases(rt, a.dtype, a.precision, a.io)
                name, layer, sets = cases[i % len(cases)]
                k = (i // len(cases)) % len(sets)
                shard, ref, scale = sets[k]
                i += 1
                if skip is not None and skip == (rt.rank, i):
                    continue  # this rank "raised between building the layer and calling it"
                if a.io:  # the shard into the layer's io inputs, the call on them (a copy of io['o'] back)
                    for x, t in zip("qkv", shard):
                        layer.io[x].copy_(t)
                    o = layer(layer.io["q"], layer.io["k"], layer.io["v"])
                else:
                    o = layer(*shard)
                if a.dtype == "bfloat16":
                    o = o.float().cpu().numpy()  # waits for the GPU
                elif not isinstance(o, np.ndarray):
                    o = o.numpy()
                rt.check()  # did this call's collective succeed? (GPU waits record failures)
                rep["calls"] += 1
                rel = float(np.abs(o - ref).max() / scale) if o.size else 0.0
                rel = rel if np.isfinite(rel) else float("inf")  # NaN (poisoned) without an error: wrong
                rep["max_rel"] = max(rep["max_rel"], rel)
                if rel > (TOL_FP8 if a.precision else TOL[a.dtype]):
                    rep["wrong"] += 1
                prev = first.setdefault((name, k), o.tobytes())
                if prev != o.tobytes():
                    rep["mismatches"] += 1
            except oneside.InjectedFault:
                rep["injected"] += 1  # a fault that 'raises and goes on': go on
        oneside.finalize()
    except Exception as e:  # noqa: BLE001 - reported, then a failing exit code
        rep["error"], rep["message"] = type(e).__name__, str(e)[:400]
        oneside.finalize(failed=True)
        code = 3
    rep["seconds"] = time.monotonic() - t0
    rep["visits"] = dict(rt.chaos.visits) if rt is not None and rt.chaos is not None else {}
    save()
    return code


# ------------------------------------------------------------------------------------------
# controller
# ------------------------------------------------------------------------------------------
def _launch(mesh: tuple[int, int], args: list[str], env: dict, deadline: float, backend: str
            ) -> tuple[list[dict | None], bool, float]:
    """Run the worker on ``mesh``; (per-rank reports or None, hung, seconds)."""
    M, G = mesh
    W = M * G
    with tempfile.TemporaryDirectory() as rep:
        cmd = [sys.executable, "-m", "oneside.launch", "-n", str(W), "--machines", str(M), "--backend", backend,
               "--grace", str(deadline + 60), __file__, "worker", "--report", rep, *args]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        hung = False
        try:
            p.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(p.pid, 9)
            p.wait()
        else:  # the launcher is gone; no rank may be left behind
            time.sleep(0.2)
            try:
                os.killpg(p.pid, 0)
                left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
                if left:
                    hung = True
                    os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
        secs = time.monotonic() - t0
        reps = []
        for r in range(W):
            f = Path(rep) / f"rank{r}.json"
            reps.append(json.loads(f.read_text()) if f.exists() else None)
    return reps, hung, secs


def _env(backend: str, chaos: str | None, fault: str | None, timeout: float) -> dict:
    env = dict(os.environ, ONESIDE_TIMEOUT=str(timeout), PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("ONESIDE_CHAOS", None)
    env.pop("ONESIDE_FAULT", None)
    if chaos:
        env["ONESIDE_CHAOS"] = chaos
    if fault:
        env["ONESIDE_FAULT"] = fault
    return env


def _layer_args(a: argparse.Namespace) -> list[str]:
    """The worker's layer options: precision, io buffers."""
    return (["--precision", a.precision] if a.precision else []) + (["--io"] if a.io else [])


def _mesh(s: str) -> tuple[int, int]:
    m, g = s.lower().split("x")
    return int(m), int(g)


def soak(a: argparse.Namespace) -> dict:
    """Every mesh in parallel, ``--calls`` layer calls each, under ONESIDE_CHAOS delays."""
    meshes = [_mesh(m) for m in a.meshes]
    t0 = time.monotonic()
    res = {"meshes": {}, "chaos": a.chaos, "backend": a.backend, "dtype": a.dtype, "precision": a.precision,
           "io_buffers": a.io}
    from concurrent.futures import ThreadPoolExecutor

    def one(i_mesh):
        i, mesh = i_mesh
        chaos = f"{a.seed + i},{a.chaos}"
        return mesh, _launch(mesh, ["--calls", str(a.calls), "--dtype", a.dtype, "--heap", a.heap, *_layer_args(a)],
                             _env(a.backend, chaos, None, a.timeout), a.deadline, a.backend)

    with ThreadPoolExecutor(a.parallel or len(meshes)) as ex:
        procs = list(ex.map(one, enumerate(meshes)))
    calls = mism = wrong = hangs = errors = 0
    for mesh, (reps, hung, secs) in procs:
        ok = [r for r in reps if r is not None]
        err = [r for r in ok if r["error"]]
        c = min((r["calls"] for r in ok), default=0)
        key = f"{mesh[0]}x{mesh[1]}"
        res["meshes"][key] = {"calls": c, "mismatches": sum(r["mismatches"] for r in ok),
                              "wrong": sum(r["wrong"] for r in ok), "max_rel": max((r["max_rel"] for r in ok), default=0),
                              "hung": hung or len(ok) < len(reps), "errors": [f"{r['error']}: {r['message']}" for r in err],
                              "seconds": round(secs, 1)}
        calls += c
        mism += res["meshes"][key]["mismatches"]
        wrong += res["meshes"][key]["wrong"]
        hangs += int(res["meshes"][key]["hung"])
        errors += len(err)
        print(f"soak {key}: {c} calls, {res['meshes'][key]['mismatches']} bitwise mismatches, "
              f"{res['meshes'][key]['wrong']} wrong, max rel err {res['meshes'][key]['max_rel']:.2e}, "
              f"{'HUNG ' if res['meshes'][key]['hung'] else ''}{len(err)} errors, {secs:.0f} s", flush=True)
    res.update(layer_calls=calls, mismatches=mism + wrong, hangs=hangs, errors=errors,
               seconds=round(time.monotonic() - t0, 1))
    return res


def _draw_fault(rng: random.Random, W: int, calls: int, visits: dict) -> tuple[str | None, str | None, str]:
    """(ONESIDE_FAULT, --skip, description) of one random fault; ``visits``: how often a clean
    run of this mesh visits each site (from a calibration run), so every drawn fault fires."""
    sites = [x for x in SITES_W if x in ("skip", "heap", "absent") or visits.get(x, 0) > 0]
    site = rng.choices(sites, weights=[SITES_W[x] for x in sites])[0]
    rank = rng.randrange(W)
    if site == "skip":
        call = rng.randint(1, calls)
        return None, f"--skip {rank}:{call}", f"rank {rank} skips call {call}"
    if site == "heap":
        return None, "--heap 200KiB", "every heap too small"
    if site == "absent":
        return None, f"--absent {rank}", f"rank {rank} never starts"
    kind = rng.choice(("die", "raise"))
    n = rng.randint(1, max(1, visits.get(site, 1)))
    return f"{rank}:{kind}:{site}:{n}", None, f"rank {rank} {kind}s at {site} visit {n}"


def faults(a: argparse.Namespace) -> dict:
    """``--runs`` runs, each with one random fault on a random mesh and rank."""
    rng = random.Random(a.seed)
    meshes = [_mesh(m) for m in a.meshes]
    injected = detected = 0
    runs = []
    t0 = time.monotonic()
    base = ["--calls", str(a.fault_calls), "--dtype", a.dtype, "--heap", a.heap, *_layer_args(a)]
    visits = {}
    for mesh in meshes:  # calibration: a clean run per mesh counts the visits of each site
        reps, hung, _ = _launch(mesh, base, _env(a.backend, f"{a.seed},0,0", None, a.timeout), a.deadline, a.backend)
        if hung or any(r is None or r["error"] for r in reps):
            raise RuntimeError(f"calibration run on mesh {mesh} failed: {reps}")
        visits[mesh] = min((r["visits"] for r in reps), key=lambda v: v.get("barrier", 0))
    for i in range(a.runs):
        mesh = meshes[i % len(meshes)]
        W = mesh[0] * mesh[1]
        fault, extra, what = _draw_fault(rng, W, a.fault_calls, visits[mesh])
        args = base + (extra.split() if extra else [])
        chaos = f"{a.seed + i},{a.chaos}" if a.chaos else None
        reps, hung, secs = _launch(mesh, args, _env(a.backend, chaos, fault, a.timeout), a.deadline, a.backend)
        victim = int((fault or extra.split()[-1]).split(":")[0]) if not (extra or "").startswith("--heap") else -1
        fired = extra is not None or (reps[victim] or {}).get("injected", 0) > 0 or reps[victim] is None
        if not fired:  # the fault's visit never came (the run ended first): not an injection
            runs.append({"mesh": mesh, "fault": what, "fired": False})
            continue
        injected += 1
        bad = []
        for r, rep in enumerate(reps):
            if r == victim and extra and extra.startswith("--absent"):
                continue
            if rep is None:
                if not (fault and ":die:" in fault and r == victim):
                    bad.append(f"rank {r}: no report (hung or killed)")
                continue
            if rep["wrong"] or rep["mismatches"]:
                bad.append(f"rank {r}: returned {rep['wrong']} wrong / {rep['mismatches']} differing outputs")
            init_fault = r == victim and fault is not None and ":init:" in fault
            if rep["error"] is None or (rep["error"] == "InjectedFault" and not init_fault):
                bad.append(f"rank {r}: finished without a clear error ({rep['error']})")
        if hung:
            bad.append("processes left running at the deadline")
        ok = not bad
        detected += ok
        errs = sorted({f"{rep['error']}" for rep in reps if rep and rep["error"]})
        runs.append({"mesh": f"{mesh[0]}x{mesh[1]}", "fault": what, "fired": True, "detected": ok,
                     "errors": errs, "problems": bad, "seconds": round(secs, 1)})
        print(f"fault {i:3d} {mesh[0]}x{mesh[1]} {what:34s} -> {'detected' if ok else 'MISSED'} "
              f"{errs} {bad} {secs:.1f} s", flush=True)
    return {"faults_injected": injected, "faults_detected": detected, "runs": runs,
            "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("soak", "faults", "all", "worker"))
    p.add_argument("--calls", type=int, default=2000, help="soak: layer calls per mesh (per rank)")
    p.add_argument("--runs", type=int, default=20, help="faults: runs, one fault each")
    p.add_argument("--fault-calls", type=int, default=12, help="faults: layer calls per run")
    p.add_argument("--meshes", nargs="+", default=["3x1", "1x3", "2x1", "2x2"])
    p.add_argument("--backend", default="host", choices=("host", "nvshmem"))
    p.add_argument("--dtype", default="float64", choices=sorted(SHAPES))
    p.add_argument("--precision", default=None, choices=("fp8", "fp8-accurate"),
                   help="the layers' precision (default: dtype)")
    p.add_argument("--io", action="store_true", help="layers with io_buffers=True, called on their io tensors")
    p.add_argument("--chaos", default="0.2,300", help="P,MAX_US of ONESIDE_CHAOS (the seed is added)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0, help="ONESIDE_TIMEOUT of the ranks")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds before a run counts as hung")
    p.add_argument("--parallel", type=int, default=0, help="soak: meshes at once (0: all)")
    p.add_argument("--heap", default="64MiB")
    p.add_argument("--write", action="store_true", help="write docs/perf/chaos.json and the summary keys")
    p.add_argument("--out", default=None, help="default docs/perf/chaos[_fp8|_fp8acc][_io].json")
    p.add_argument("--summary", default=str(ROOT / "docs" / "perf" / "summary.json"))
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--skip", help=argparse.SUPPRESS)
    p.add_argument("--absent", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mode == "worker":
        return worker(a)
    ptag = {"fp8": "fp8", "fp8-accurate": "fp8acc"}.get(a.precision, "")
    tag = (f"_{ptag}" if ptag else "") + ("_io" if a.io else "")
    a.out = a.out or str(ROOT / "docs" / "perf" / f"chaos{tag}.json")
    res: dict = {"command": "python perf/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.mode in ("soak", "all"):
        res["soak"] = soak(a)
    if a.mode in ("faults", "all"):
        a.deadline = min(a.deadline, 6 * a.timeout + 60)
        res["faults"] = faults(a)
    print(json.dumps({k: v for k, v in res.items() if k not in ("faults",)} | (
        {"faults": {k: v for k, v in res["faults"].items() if k != "runs"}} if "faults" in res else {}), indent=1))
    if a.write:
        sys.path.insert(0, str(ROOT / "perf"))
        from common import update_summary

        Path(a.out).write_text(json.dumps(res, indent=1))
        keys = {}
        fp8 = (f"{ptag}_" if ptag else "") + ("io_" if a.io else "")
        if "soak" in res:
            s = res["soak"]
            pre = fp8 + ("gpu_stress_" if a.backend == "nvshmem" else "chaos_")
            keys.update({pre + "layer_calls": s["layer_calls"], pre + "mismatches": s["mismatches"],
                         pre + "hangs": s["hangs"]})
        if "faults" in res:
            f = res["faults"]
            pre = fp8 + ("gpu_" if a.backend == "nvshmem" else "")
            keys.update({pre + "faults_injected": f["faults_injected"], pre + "faults_detected": f["faults_detected"]})
        update_summary(keys, Path(a.summary))
    bad = (res.get("soak", {}).get("mismatches", 0) or res.get("soak", {}).get("hangs", 0)
           or res.get("soak", {}).get("errors", 0)
           or ("faults" in res and res["faults"]["faults_detected"] != res["faults"]["faults_injected"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
