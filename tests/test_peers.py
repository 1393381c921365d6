"""The peer benchmark and the GPU script, on CPUs: perf/attention_vs_peers.py's equality checks
(yunchang vs sfattn over gloo, host backend), report_peers' summary keys, bench_layer's result
names, scripts/gpu_peers.sh's syntax and defaults."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "perf"
SCRIPT = ROOT / "scripts" / "gpu_peers.sh"


def _load(name: str):
    sys.path.insert(0, str(PERF))
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_yunchang_vs_sfattn_equal_on_host_ranks(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("yunchang")
    cmd = [sys.executable, "-m", "oneside.launch", "-n", "2", "--backend", "host", str(PERF / "attention_vs_peers.py"),
           "--shapes", "64x4x32,48x6x16", "--out", str(tmp_path), "--tag", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "peers_cpu.json").read_text())
    assert data["meta"]["timed"] is False and data["meta"]["device"] == "cpu"
    for shape in ("64x4x32", "48x6x16"):
        err = data["rel_error"][shape]
        assert err["yunchang U2xR1 torch_math"] < 1e-2
        for algo in ("ulysses", "ring", "usp", "tas", "torus"):
            for local in ("kernel", "torch"):
                assert err[f"sfattn {algo} {local}"] < 1e-2
    assert "zero log-sum-exp" in data["skipped"]["yunchang U1xR2 torch_math"]


def test_yunchang_configs_skip_wrong_ones():
    pytest.importorskip("torch")
    peers = _load("attention_vs_peers")
    run, skipped = peers.yunchang_configs(2, 24, gpu=True)
    assert run == [(1, "TORCH_FLASH"), (2, "TORCH_CUDNN"), (2, "TORCH_FLASH")]
    assert list(skipped) == ["yunchang U1xR2 torch_cudnn"]
    run, skipped = peers.yunchang_configs(4, 6, gpu=True)
    assert (4, "TORCH_FLASH") not in run and "6 heads" in skipped["yunchang U4xR1 torch_flash"]
    assert peers.parse_shape("flux3072") == (37376, 24, 128) and peers.parse_shape("8x2x4") == (8, 2, 4)
    with pytest.raises(ValueError, match="SxHxD"):
        peers.parse_shape("flux9")


def test_report_peers_keys(tmp_path, monkeypatch):
    report = _load("report_peers")
    monkeypatch.setattr(sys.modules["common"], "DOCS", tmp_path)
    row = lambda yc, yf, st, sk: {"sdpa_1gpu_cudnn": 30.0, "yunchang U2xR1 torch_cudnn": yc,  # noqa: E731
                                  "yunchang U2xR1 torch_flash": yf, "yunchang U1xR2 torch_flash": yf + 1,
                                  "sfattn usp torch": st, "sfattn ring torch": st + 1, "sfattn usp kernel": sk}
    a = tmp_path / "peers.json"
    a.write_text(json.dumps({"meta": {"command": "c", "ranks": 2, "device": "d", "timed": True},
                             "ms": {"flux3072": row(21.0, 19.0, 20.0, 18.0), "flux4096": row(50.0, 45.0, 52.0, 44.0)}}))
    b = tmp_path / "peers_video.json"  # a second file (shapes split over runs) is merged
    b.write_text(json.dumps({"meta": {"command": "c", "ranks": 2, "device": "d", "timed": True},
                             "ms": {"video20s": row(200.0, 210.0, 190.0, 220.0)}}))
    report.main([a, b])
    s = json.loads((tmp_path / "perf" / "summary.json").read_text())
    assert s["best_over_yunchang_flux3072_same_kernel"] == round(21.0 / 20.0, 3)
    assert s["worst_over_yunchang_any_shape"] == round(50.0 / 52.0, 3)  # same kernel, worst shape
    assert s["worst_over_yunchang_any_shape_any_kernel"] == round(45.0 / 44.0, 3)  # best of each
    c = tmp_path / "peers_cpu.json"
    c.write_text(json.dumps({"meta": {"timed": False}, "ms": {}}))
    with pytest.raises(ValueError, match="untimed"):
        report.main([c])


def test_bench_layer_names_shared_gpu_runs():
    pytest.importorskip("torch")
    bench = _load("bench_layer")
    assert bench.ranks_per_gpu(4, 2) == 2 and bench.ranks_per_gpu(2, 2) == 1 and bench.ranks_per_gpu(2, 8) == 1
    assert bench.ranks_per_gpu(3, 2) == 2 and bench.ranks_per_gpu(2, 0) == 1
    assert bench.result_name("4x1", "10,10", 2) == "layer_4x1_link10_10_rpg2.json"
    assert bench.result_name("2x1", "40,10", 1) == "layer_2x1_link40_10.json"
    assert bench.result_name("1x2", None, 1) == "layer_1x2.json"
    assert bench.result_name("2x1", "10,10", 2, "fp8") == "layer_2x1_link10_10_rpg2_fp8.json"
    assert bench.result_name("2x1", "10,10", 2, "fp8-accurate") == "layer_2x1_link10_10_rpg2_fp8acc.json"


def test_gpu_peers_script():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    model = _load("model")
    fmt = lambda links: " ".join(f"{x:g},{model.EMULATED_LATENCY_US:g}" for x in links)  # noqa: E731
    assert f"VM2_LINKS=${{VM2_LINKS-{fmt(model.VM2_LINKS)}}}" in text
    assert f"VM4_LINKS=${{VM4_LINKS-{fmt(model.VM4_LINKS)}}}" in text
    assert "--no-index" in text and "timeout" in text and "NVSHMEM_DISABLE_NVLS=1" in text
    for name in re.findall(r'"vm[24]_link[^"]*"', text):
        assert re.fullmatch(r'"vm[24]_link\$\{link/,/_\}"', name)
    env = dict(os.environ, GPU_PEERS_STEPS="peers bogus", OUT="/nonexistent/never-made")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stdout
