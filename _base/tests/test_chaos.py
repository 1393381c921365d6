"""Reliability on the host backend: call-site tags on barriers, agreement on layers, the chaos
harness (CI slice: a short soak and a few injected faults; the full run is a command in
docs/reliability.md)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import oneside
import sfattn
from oneside.chaos import Chaos, parse_chaos, parse_fault

from ranks import all_ok, run_ranks

ROOT = Path(__file__).resolve().parent.parent


def _barrier_from_two_sites(rt):
    if rt.rank == 0:
        rt.barrier_all()  # a different line than rank 1's
    else:
        rt.barrier_all()
    return "returned"


def test_barrier_from_another_call_site_raises_on_every_rank():
    res = run_ranks(_barrier_from_two_sites, 2, timeout=5)
    for status, value in res:
        assert status == "err" and value[0] == "CollectiveMismatchError", res
        assert "different call site" in value[1]


def _skip_after_build(rt):
    """The reliability issue's repro: rank 1 does not call a layer it built, then all build and call
    another one. Before call-site tags the others' barriers matched rank 1's next ones."""
    H, S, D = 6, 31, 8
    ring = sfattn.SPAttention(rt, sfattn.make_plan(rt.mesh, H, S, D, "ring"), 1, "float64")
    rng = np.random.default_rng(0)
    x = [np.ascontiguousarray(rng.standard_normal((1, S, H, D))[:, rt.rank * ring.Sl:][:, :ring.shard_len()])
         for _ in range(3)]
    if rt.rank != 1:
        ring(*x)
    usp = sfattn.SPAttention(rt, sfattn.make_plan(rt.mesh, H, S, D, "usp"), 1, "float64")
    usp(*x)
    return "returned"


@pytest.mark.parametrize("mesh", [(3, 1), (1, 3)])
def test_a_rank_skipping_a_call_makes_every_rank_raise(mesh):
    res = run_ranks(_skip_after_build, mesh[0] * mesh[1], machines=mesh[0], timeout=5, deadline=40)
    for status, value in res:
        assert status == "err", res
        assert value[0] in ("CollectiveMismatchError", "PeerDeadError"), value


def _different_layers(rt):
    S = 40 if rt.rank == 0 else 41
    sfattn.SPAttention(rt, sfattn.make_plan(rt.mesh, 4, S, 8, "ring"), 1, "float64")


def test_layers_built_differently_name_the_difference():
    res = run_ranks(_different_layers, 2, timeout=5)
    for status, value in res:
        assert status == "err" and value[0] == "CollectiveMismatchError", res
        assert "SPAttention differs between ranks" in value[1] and "seq_len=" in value[1], value[1]


def _agree_cases(rt):
    rt.agree("same", {"a": 1, "b": 2.5, "c": "usp"})
    with pytest.raises(oneside.CollectiveMismatchError, match=r"rank [01] has c='(ring|usp)'"):
        rt.agree("algo", {"c": "usp" if rt.rank == 0 else "ring"})
    with pytest.raises(oneside.CollectiveMismatchError, match="different collective"):
        rt.agree("x" if rt.rank == 0 else "y", {"a": 1})
    with pytest.raises(ValueError, match="at most"):
        rt.agree("big", {str(i): i for i in range(40)})
    rt.barrier_all()
    return True


def test_agree_names_fields_and_collectives():
    all_ok(run_ranks(_agree_cases, 2, timeout=5))


def test_chaos_and_fault_specs():
    assert parse_chaos("7") == (7, 0.25, 2e-3)
    assert parse_chaos("7,0.5,100") == (7, 0.5, 1e-4)
    assert parse_fault("1:die:barrier:3") == (1, "die", "barrier", 3)
    for bad in ("x", "1,2", "1,0.5,1,1"):
        with pytest.raises(ValueError, match="ONESIDE_CHAOS"):
            parse_chaos(bad)
    for bad in ("1:die:barrier", "1:explode:barrier:1", "1:die:nowhere:1", "a:die:barrier:1", "1:die:barrier:0"):
        with pytest.raises(ValueError, match="ONESIDE_FAULT"):
            parse_fault(bad)
    # reproducible: the same seed gives the same delays on a rank, another rank other ones
    draws = [[Chaos(r, 5, 1.0, 1.0).rng.random() for _ in range(3)] for r in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    c = Chaos(0, 1, 0.0, 0.0, fault=(0, "raise", "barrier", 2))
    c.point("barrier")
    with pytest.raises(oneside.InjectedFault, match="barrier visit 2"):
        c.point("barrier")
    c.point("barrier")  # fires once
    assert Chaos(1, 1, fault=(0, "raise", "barrier", 1)).fault is None  # another rank's fault


def _harness():
    spec = importlib.util.spec_from_file_location("chaos_harness", ROOT / "perf" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chaos_harness_ci_slice(tmp_path):
    """A short soak on two meshes under delays, then injected faults: outputs bitwise stable and
    right, every fault detected by every surviving rank, nothing hung."""
    h = _harness()
    out = tmp_path / "chaos.json"
    rc = h.main(["all", "--calls", "60", "--meshes", "2x1", "1x3", "--runs", "4", "--fault-calls", "6",
                 "--timeout", "4", "--deadline", "120", "--chaos", "0.3,500", "--out", str(out)])
    assert rc == 0
    # (without --write nothing is written; run the summary path on a copy of the result)
    assert not out.exists()


def test_chaos_harness_fp8_slice(tmp_path):
    """The same with precision='fp8' layers (quantised on the owning rank, FP8 parts on the wire)."""
    h = _harness()
    rc = h.main(["all", "--calls", "40", "--meshes", "2x1", "1x3", "--runs", "2", "--fault-calls", "6",
                 "--timeout", "4", "--deadline", "120", "--chaos", "0.3,500", "--precision", "fp8",
                 "--out", str(tmp_path / "chaos_fp8.json")])
    assert rc == 0


def test_harness_counts_a_wrong_output_as_a_miss(tmp_path, monkeypatch):
    """The harness itself must fail when a rank returns wrong numbers: fake one run's reports."""
    h = _harness()
    fake = [{"rank": 0, "calls": 6, "mismatches": 0, "wrong": 1, "max_rel": 0.5, "error": "PeerDeadError",
             "message": "", "injected": 1, "visits": {"barrier": 5}},
            None]
    clean = [{"rank": r, "calls": 6, "mismatches": 0, "wrong": 0, "max_rel": 0, "error": None, "message": "",
              "injected": 0, "visits": {"barrier": 5}} for r in range(2)]
    launches = []

    def fake_launch(mesh, args, env, deadline, backend):
        launches.append(args)
        return (clean if len(launches) == 1 else fake), False, 0.1  # the first is the calibration run

    monkeypatch.setattr(h, "_launch", fake_launch)
    res = h.faults(h.argparse.Namespace(seed=2, meshes=["2x1"], runs=3, fault_calls=6, dtype="float64",
                                        heap="4MiB", chaos=None, timeout=1, deadline=5, backend="host",
                                        precision=None, io=False))
    assert res["faults_injected"] == 3 and res["faults_detected"] == 0
    assert any("wrong" in " ".join(r["problems"]) for r in res["runs"])
    json.dumps(res)


def test_chaos_harness_io_slice(tmp_path):
    """The same with io buffers: the in-place Ulysses (1 x 3: members read and write each other's
    heaps between two barriers) and the exchange on io tensors (2 x 1)."""
    h = _harness()
    rc = h.main(["all", "--calls", "60", "--meshes", "1x3", "2x1", "--runs", "4", "--fault-calls", "6",
                 "--timeout", "4", "--deadline", "120", "--chaos", "0.3,500", "--io",
                 "--out", str(tmp_path / "chaos_io.json")])
    assert rc == 0
