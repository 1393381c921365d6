"""The performance model's invariants (perf/model.py; CPU only, no torch)."""
import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parent.parent / "perf" / "model.py"
_spec = importlib.util.spec_from_file_location("perf_model", _path)
model = importlib.util.module_from_spec(_spec)
sys.modules["perf_model"] = model
_spec.loader.exec_module(model)

SYSTEMS = list(model.SYSTEMS.values())
MESHES = [(M, G) for M in (1, 2, 3, 4) for G in (1, 2, 4, 8)]


def plans(params, shapes=tuple(model.SHAPES), meshes=MESHES, algorithms=model.ALGORITHMS):
    """Every (algorithm, machines, gpus, shape) the planner accepts, with its prediction."""
    for s in shapes:
        for M, G in meshes:
            for a in algorithms:
                try:
                    yield (a, M, G, s), model.predict(a, M, G, s, params)
                except ValueError:  # e.g. ulysses with 24 heads on 16 ranks
                    continue


def test_one_gpu_is_compute():
    for p in SYSTEMS:
        for a in model.ALGORITHMS:
            for s, shape in model.SHAPES.items():
                r = model.predict(a, 1, 1, s, p)
                assert r["total_ms"] == r["compute_ms"] and r["exposed_comm_ms"] == 0.0
                flops = 4 * shape.batch * shape.seq_len ** 2 * shape.heads * shape.head_dim
                assert r["compute_ms"] == pytest.approx(flops / (p.tflops(shape.head_dim) * 1e9))


@pytest.mark.parametrize("overlap", [True, False])
def test_more_bandwidth_never_slower(overlap):
    base = replace(model.A100_P4DE, overlap=overlap)
    meshes = [(1, 8), (2, 1), (2, 8), (3, 8), (4, 4), (4, 8)]
    for which in ("intra", "inter"):
        prev = None
        for f in (0.1, 0.5, 1.0, 2.0, 10.0):
            link = getattr(base, which)
            p = replace(base, **{which: replace(link, GBps=link.GBps * f, latency_us=link.latency_us / f)})
            cur = {k: r["total_ms"] for k, r in plans(p, ("flux3072", "video20s"), meshes)}
            if prev:
                assert cur.keys() == prev.keys()
                for k in cur:
                    assert cur[k] <= prev[k] * (1 + 1e-12), (which, f, k)
            prev = cur


def test_overlap_never_slower_than_serial():
    for p in SYSTEMS:
        serial = dict(plans(replace(p, overlap=False), ("flux4096",)))
        for k, r in plans(p, ("flux4096",)):
            assert r["total_ms"] <= serial[k]["total_ms"] * (1 + 1e-12), k


def test_free_communication_ties_every_algorithm():
    free = replace(model.H200_CLUSTER, intra=model.Link(math.inf), inter=model.Link(math.inf),
                   barrier_us=0.0, hbm_GBps=math.inf, fixed_ms=0.0)
    n = 0
    for (a, M, G, s), r in plans(free):
        assert r["total_ms"] == pytest.approx(r["compute_ms"], rel=1e-12), (a, M, G, s)
        assert r["total_ms"] == pytest.approx(model.predict("ring", M, G, s, free)["total_ms"], rel=1e-12)
        n += 1
    assert n > 200


def test_torus_never_slower_than_tas():
    """With the designed overlap and an inter-machine link no faster per GPU than NVLink."""
    n = 0
    for p in SYSTEMS:
        for f in (0.01, 0.1, 0.5, 1.0):
            for pipelined in (True, False):
                q = replace(p, inter=replace(p.inter, GBps=p.inter.GBps * f), ring_pipelined=pipelined)
                for s in model.SHAPES:
                    for M, G in MESHES:
                        if q.inter.GBps * q.inter.efficiency / G > q.intra.GBps * q.intra.efficiency:
                            continue
                        tas = model.predict("tas", M, G, s, q)["total_ms"]
                        assert model.predict("torus", M, G, s, q)["total_ms"] <= tas * (1 + 1e-12), (p.name, f, s, M, G)
                        n += 1
    assert n > 500


def test_two_machines_tas_crosses_as_much_as_usp_ring():
    for G in (1, 2, 4, 8):
        for s, shape in model.SHAPES.items():
            L = shape.batch * -(-shape.seq_len // (2 * G)) * shape.heads * shape.head_dim * 2
            tas, usp, torus = (model.predict(a, 2, G, s, model.A100_P4DE) for a in ("tas", "usp", "torus"))
            assert usp["R"] == 2 and tas["U"] % 2 == 0
            assert tas["inter_bytes"] == pytest.approx(usp["inter_bytes"]) == pytest.approx(2 * L)
            assert torus["inter_bytes"] == pytest.approx(2 * L)
    # beyond 2 machines the all-to-all volume shrinks while the ring's grows
    tas4, usp4 = (model.predict(a, 4, 8, "flux3072", model.A100_P4DE)["inter_bytes"] for a in ("tas", "usp"))
    assert tas4 < usp4


def test_paper_trends():
    p = model.A100_P4DE
    for s in ("flux3072", "flux4096"):
        assert model.predict("tas", 2, 8, s, p)["total_ms"] > model.predict("usp", 2, 8, s, p)["total_ms"]
        assert model.predict("torus", 2, 8, s, p)["total_ms"] < model.predict("usp", 2, 8, s, p)["total_ms"]
        assert model.predict("torus", 4, 8, s, p)["total_ms"] < model.predict("usp", 4, 8, s, p)["total_ms"]


@pytest.mark.parametrize("overlap", [False, True])
def test_calibration_recovers_synthetic(overlap):
    true = replace(model.H200_PAIR, tflops_d128=480.0, tflops_d64=350.0, fixed_ms=0.2, overlap=overlap)
    points = [dict(machines=M, gpus=G, shape=s, algorithm=a, ms=model.predict(a, M, G, s, true)["total_ms"])
              for M, G in ((1, 2), (2, 1), (2, 2)) for s in ("flux3072", "flux4096", "video20s")
              for a in model.ALGORITHMS]
    points.append(dict(machines=1, gpus=1, shape="flux3072", algorithm="sdpa_1gpu_cudnn", ms=1.0))  # ignored
    fit = model.calibrate(points, replace(true, tflops_d128=600.0, tflops_d64=600.0, fixed_ms=0.0))
    assert fit.tflops_d128 == pytest.approx(480.0, rel=1e-6)
    assert fit.tflops_d64 == pytest.approx(350.0, rel=1e-6)
    assert fit.fixed_ms == pytest.approx(0.2, rel=1e-5)
    assert max(abs(r["rel_error"]) for r in model.calibration_table(points, fit)) < 1e-4


def test_measured_calibration_within_noise():
    root = _path.parent.parent / "docs" / "perf"
    points = model.load_measurements([root / "layer_1x2.json", root / "layer_2x1.json"])
    base = replace(model.H200_PAIR, overlap=False, ring_pipelined=False)
    fit = model.calibrate(points, base)
    assert 400 < fit.tflops_d128 < 700 and 300 < fit.tflops_d64 < 500
    assert max(abs(r["rel_error"]) for r in model.calibration_table(points, fit)) < 0.08


def test_paced_link_prediction():
    """2 virtual machines on 2 GPUs: a slower paced link costs time, Torus hides more than TAS."""
    fast, slow = (replace(model.H200_PAIR, inter=model.Link(x, 4.0)) for x in (395.0, 25.0))
    for a in model.ALGORITHMS:
        assert model.predict(a, 2, 1, "flux3072", slow)["total_ms"] > model.predict(a, 2, 1, "flux3072", fast)["total_ms"]
    tas, torus = (model.predict(a, 2, 1, "flux3072", slow) for a in ("tas", "torus"))
    assert torus["exposed_comm_ms"] < tas["exposed_comm_ms"]
    assert set(tas) >= {"total_ms", "compute_ms", "exposed_comm_ms"}


def test_bad_arguments():
    s = model.SHAPES["flux3072"]
    with pytest.raises(ValueError, match="algorithm"):
        model.predict("fastest", 2, 8, s)
    with pytest.raises(ValueError, match="machines"):
        model.predict("torus", 0, 8, s)
    with pytest.raises(ValueError, match="gpus"):
        model.predict("torus", 1, -1, s)
    with pytest.raises(ValueError, match="heads"):
        model.predict("ulysses", 1, 5, s)          # 24 heads on 5 ranks
    with pytest.raises(ValueError, match="heads"):
        model.predict("torus", 5, 8, s)            # 24 heads, 5 machines
    with pytest.raises(ValueError, match="heads"):
        model.predict("usp", 1, 2, model.Shape(1000, 0, 64))
    with pytest.raises(ValueError, match="points"):
        model.calibrate([], model.H200_PAIR)


# -- ranks sharing a GPU (4 virtual machines on 2 GPUs) -----------------------------------------
def test_ranks_per_gpu_slows_compute_not_links():
    free = replace(model.H200_PAIR, intra=model.Link(math.inf), inter=model.Link(math.inf), barrier_us=0.0,
                   hbm_GBps=math.inf, fixed_ms=0.0)
    slow = replace(model.H200_PAIR, inter=model.Link(10.0, 10.0))
    for a in model.ALGORITHMS:
        one, two = (model.predict(a, 4, 1, "flux3072", replace(free, ranks_per_gpu=k)) for k in (1, 2))
        assert two["compute_ms"] == pytest.approx(2 * one["compute_ms"])
        assert two["total_ms"] == pytest.approx(2 * one["total_ms"])
        # links are not shared out: the bytes and the transfer times are the same
        s1, s2 = (model.predict(a, 4, 1, "flux3072", replace(slow, ranks_per_gpu=k)) for k in (1, 2))
        assert s2["inter_bytes"] == s1["inter_bytes"]
        assert s2["total_ms"] >= s1["total_ms"]
        # more compute to hide behind: exposed communication never grows
        assert s2["exposed_comm_ms"] <= s1["exposed_comm_ms"] + 1e-9


def test_ranks_per_gpu_rejects_bad_values():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="ranks_per_gpu"):
            model.predict("usp", 4, 1, "flux3072", replace(model.H200_PAIR, ranks_per_gpu=bad))


def test_four_virtual_machines_prediction():
    """The setting of scripts/gpu_peers.sh's vm4 step: Torus ahead where the link is slow."""
    rows = model.emulated_prediction(model.H200_PAIR, 4, 2, model.VM4_LINKS)
    assert {r["inter_GBps"] for r in rows} == set(model.VM4_LINKS)
    slowest = [r for r in rows if r["inter_GBps"] == min(model.VM4_LINKS)]
    assert all(r["order"].startswith("torus <") and r["torus_over_usp"] > 1.2 for r in slowest)


def test_two_machine_peak_gain_at_the_script_links():
    """VM2_LINKS hold each shape's largest Torus / USP gain over a fine grid (fitted params)."""
    import json

    d = json.loads((_path.parent.parent / "docs" / "perf" / "model_calibration.json").read_text())["params_fitted"]
    p = model.Params(**{**d, "intra": model.Link(**d["intra"]), "inter": model.Link(**d["inter"])})
    grid = [x / 2 for x in range(6, 81)]  # 3 - 40 GB/s
    for s in ("flux3072", "flux4096"):
        gain = {x: model.emulated_prediction(p, 2, 1, (x,), (s,))[0]["torus_over_usp"] for x in grid}
        peak = max(gain.values())
        assert max(gain[x] for x in model.VM2_LINKS) == pytest.approx(peak, abs=0.01), s


def _layer_file(tmp_path, name, mesh, link, rpg, ms):
    import json

    meta = {"mesh": mesh, "emulated_link": link, "ranks": 4, "gpus": 2, "device": "x", "command": "x"}
    if rpg is not None:
        meta["ranks_per_gpu"] = rpg
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta, "ms": ms}))
    return path


def test_calibration_reads_ranks_per_gpu_files(tmp_path):
    true = replace(model.H200_PAIR, tflops_d128=480.0, tflops_d64=350.0, fixed_ms=0.2)
    files = []
    for M, G, link, rpg in ((1, 2, None, None), (2, 1, None, 1), (2, 1, "10,10", None), (4, 1, "10,10", 2),
                            (4, 1, "40,10", 2)):
        pt = lambda a, s: dict(machines=M, gpus=G, shape=s, algorithm=a, inter=(10.0, 10.0) if link else None,  # noqa: E731
                               ranks_per_gpu=rpg or 1)
        ms = {s: {a: model.predict(a, M, G, s, model._at(pt(a, s), true))["total_ms"] for a in model.ALGORITHMS}
              for s in ("flux3072", "video20s")}
        if link == "40,10":
            ms = {s: {a: model.predict(a, M, G, s, replace(true, inter=model.Link(40.0, 10.0), ranks_per_gpu=2))
                      ["total_ms"] for a in model.ALGORITHMS} for s in ("flux3072", "video20s")}
        files.append(_layer_file(tmp_path, f"f{len(files)}.json", f"{M}x{G}", link, rpg, ms))
    points = model.load_measurements(files)
    assert {p["ranks_per_gpu"] for p in points} == {1, 2}
    fit = model.calibrate(points, replace(true, tflops_d128=600.0, tflops_d64=600.0, fixed_ms=0.0))
    assert fit.tflops_d128 == pytest.approx(480.0, rel=1e-5) and fit.fixed_ms == pytest.approx(0.2, rel=1e-4)
    table = model.calibration_table(points, fit)
    assert any("(2 ranks/GPU)" in r["mesh"] for r in table)
    check = model.order_check(points, fit)
    assert check["pairs_compared"] > 0 and check["pairs_matched"] == check["pairs_compared"]
    summary = model.order_summary(check)
    assert summary["model_emulated_rpg_order_pairs_matched"] == summary["model_emulated_rpg_order_pairs_compared"] > 0


def test_load_measurements_errors(tmp_path):
    bad_mesh = _layer_file(tmp_path, "a.json", "four", None, None, {})
    with pytest.raises(ValueError, match="meta.mesh"):
        model.load_measurements([bad_mesh])
    bad_rpg = _layer_file(tmp_path, "b.json", "4x1", None, 0, {"flux3072": {"usp": 1.0}})
    with pytest.raises(ValueError, match="ranks_per_gpu"):
        model.load_measurements([bad_rpg])
    bad_shape = _layer_file(tmp_path, "c.json", "4x1", None, 2, {"flux9999": {"usp": 1.0}})
    with pytest.raises(ValueError, match="flux9999"):
        model.load_measurements([bad_shape])


def test_cli_ranks_per_gpu(capsys):
    import json

    model.main(["--predict", "usp", "--machines", "4", "--gpus", "1", "--ranks-per-gpu", "2", "--inter-GBps", "10"])
    two = json.loads(capsys.readouterr().out)
    model.main(["--predict", "usp", "--machines", "4", "--gpus", "1", "--inter-GBps", "10"])
    one = json.loads(capsys.readouterr().out)
    assert two["compute_ms"] == pytest.approx(2 * one["compute_ms"])
    with pytest.raises(SystemExit):
        model.main(["--predict", "usp", "--machines", "4", "--gpus", "1", "--ranks-per-gpu", "0"])


def test_ranks_per_gpu_scales_layout_copies_exactly():
    p = replace(model.H200_PAIR, fixed_ms=0.0)
    for a in model.ALGORITHMS:  # torus has T = 4 here: its stage loop must not touch the factor
        one, two = (model.predict(a, 4, 1, "flux3072", replace(p, ranks_per_gpu=k)) for k in (1, 2))
        assert two["overhead_ms"] == pytest.approx(2 * one["overhead_ms"]), a


def test_check_finds_its_own_predictions_exact_and_refits_a_slower_kernel():
    truth = replace(model.H200_PAIR, overlap=True, ranks_per_gpu=2)
    pts = []
    for x in (40.0, 10.0):
        p = replace(truth, inter=model.Link(x, 10.0))
        for s in ("flux3072", "video20s"):
            for a in ("usp", "tas", "torus"):
                pts.append(dict(machines=2, gpus=1, shape=s, algorithm=a, inter=(x, 10.0), ranks_per_gpu=2,
                                ms=model.predict(a, 2, 1, s, p)["total_ms"]))
    assert model.check(pts, truth)["max_rel_error"] < 1e-9
    slow = replace(truth, tflops_d128=truth.tflops_d128 * 1.3, tflops_d64=truth.tflops_d64 * 1.3)
    res = model.check(pts, slow)
    assert res["max_rel_error"] > 0.1 and res["max_rel_error_refit"] < 0.02, res


def test_fp8_moves_half_the_qkv_bytes_and_never_slows_a_plan():
    base = replace(model.H200_PAIR, inter=model.Link(10.0, 10.0))
    fp8 = replace(base, qkv_itemsize=1.0)
    for a in ("usp", "tas", "torus"):
        b, f = (model.predict(a, 2, 1, "flux3072", p) for p in (base, fp8))
        assert f["total_ms"] <= b["total_ms"] + 1e-9, a
        # Ulysses and Torus move Q, K, V (1 byte) and O (2): 5/8 of the bytes; a ring only K and V: 1/2
        want = 0.5 if b["U"] == b["T"] == 1 else 5 / 8
        assert math.isclose(f["inter_bytes"] + f["intra_bytes"], want * (b["inter_bytes"] + b["intra_bytes"]),
                            rel_tol=1e-9), (a, f, b)


def test_fp8_accurate_moves_q_and_k_in_one_byte_and_v_in_two():
    """precision='fp8-accurate': Q and K at one byte per element, V at two (O stays): Ulysses and
    Torus move (1 + 1 + 2 + 2) / 8 = 3/4 of bf16's bytes, a ring (K and V only) 3/4 too; between fp8
    and bf16 in time."""
    base = replace(model.H200_PAIR, inter=model.Link(10.0, 10.0))
    fp8, acc = replace(base, qkv_itemsize=1.0), replace(base, qkv_itemsize=1.0, v_itemsize=2.0)
    for a in ("ulysses", "ring", "usp", "tas", "torus"):
        try:
            b, f, c = (model.predict(a, 2, 1, "flux3072", p) for p in (base, fp8, acc))
        except model._plan.PlanError:
            continue
        assert f["total_ms"] - 1e-9 <= c["total_ms"] <= b["total_ms"] + 1e-9, a
        assert math.isclose(c["inter_bytes"] + c["intra_bytes"], 0.75 * (b["inter_bytes"] + b["intra_bytes"]),
                            rel_tol=1e-9), (a, c, b)


def test_measurements_carry_the_precision(tmp_path):
    """load_measurements: bf16, fp8 and fp8-accurate layer files give the byte sizes above, and
    check() refuses a mix of precisions."""
    import json
    pts = []
    for prec in ("bf16", "fp8", "fp8-accurate"):
        f = tmp_path / f"layer_{prec}.json"
        f.write_text(json.dumps({"meta": {"mesh": "2x1", "precision": prec, "emulated_link": "10,10",
                                          "ranks_per_gpu": 2}, "ms": {"flux3072": {"torus": 30.0}}}))
        pts.append(model.load_measurements([f])[0])
    assert [(p["qkv_itemsize"], p["v_itemsize"]) for p in pts] == [(0.0, 0.0), (1.0, 0.0), (1.0, 2.0)]
    with pytest.raises(ValueError, match="several precisions"):
        model.check(pts, model.H200_PAIR)
