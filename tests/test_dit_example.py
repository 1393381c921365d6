"""examples/dit_sp.py on tiny models of every family (CPU, host backend + gloo, float64).

Token counts that do not divide by the ranks, 2 and 3 ranks: sfattn under diffusers' context
parallelism equals one rank; with equal shards diffusers' own Ulysses (and yunchang's USP where
it runs on CPUs) beside it, equal too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ranks import all_ok, free_port, run_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _example(rt, argv):
    import dit_sp

    return dit_sp.run(rt, dit_sp.parse_args(argv))


def _run(world: int, argv: list[str]) -> dict:
    argv = [*argv, "--tiny", "--steps", "2", "--warmup", "0", "--dist-init", f"tcp://127.0.0.1:{free_port()}"]
    r = all_ok(run_ranks(_example, world, heap="16MiB", deadline=240, timeout=120, argv=argv))[0]
    assert r["ok"], r["failures"]
    return r


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", ["flux", "flux2", "qwenimage", "wan", "ltx"])
def test_every_family_with_uneven_tokens_matches_one_rank(model, world):
    r = _run(world, ["--model", model, "--peers", "usp"])  # 5 x 5 tokens per frame, 7 text tokens, 3 heads
    assert r["uneven"]
    assert set(r["ms"]) == {"1gpu", "sfattn"}
    assert max(r["rel_err"]["sfattn"].values()) < 1e-12, r["rel_err"]
    assert "usp skipped" in " ".join(r["notes"])


@pytest.mark.parametrize("precision", ["fp8", "fp8-accurate"])
def test_fp8_precision_beside_the_models_dtype(precision):
    """--precision fp8 / fp8-accurate: sfattn-fp8 (FP8 layers, the float64 emulation of the FP8 kernel
    here) runs on the same shards; its latents differ from sfattn's by the FP8 error, not by nothing."""
    r = _run(2, ["--model", "flux", "--peers", "--precision", precision])
    assert set(r["ms"]) == {"1gpu", "sfattn", "sfattn-fp8"}
    e = r["rel_err"]["sfattn-fp8"]
    assert 1e-6 < e["final_vs_sfattn"] < 0.02 and 1e-6 < e["first_step"] < 0.02, e
    assert "fp8" in r["describe"]["sfattn-fp8"]


@pytest.mark.parametrize("model", ["flux", "flux2", "qwenimage", "wan"])
def test_equal_shards_equal_diffusers_own_ulysses(model):
    """Where diffusers' own CP runs on gloo (equal shards; Ulysses with its "anything" heads):
    sfattn and it both equal one rank. (LTX: diffusers' own path fails on its text mask, see
    tests/test_dit_models.py.)"""
    r = _run(2, ["--model", model, "--height", str(4 * 16), "--width", str(4 * 16), "--text-len", "8",
                 "--peers", "diffusers-ulysses"])
    assert not r["uneven"]
    assert set(r["ms"]) == {"1gpu", "sfattn", "diffusers-ulysses"}
    assert max(r["rel_err"]["sfattn"].values()) < 1e-12
    assert max(r["rel_err"]["diffusers-ulysses"].values()) < 1e-12


@pytest.mark.parametrize("model,extra", [("flux", ["--compile", "--compile-backend", "aot_eager"]),
                                         ("wan", ["--frames", "5"])])
def test_three_ranks(model, extra):
    r = _run(3, ["--model", model, *extra])
    assert max(r["rel_err"]["sfattn"].values()) < 1e-12, r["rel_err"]
    if "--compile" in extra:
        assert r["graphs"]["sfattn"] == 2  # the forward and sfattn's pre-hook: no recompilation between steps


def test_padded_text_mask_at_three_ranks():
    """Qwen-Image with a padded prompt: a key mask, gathered with K/V (diffusers' own anything
    mode shifts it when a middle rank is short: tests/test_dit_models.py)."""
    r = _run(3, ["--model", "qwenimage", "--text-pad", "2"])
    assert max(r["rel_err"]["sfattn"].values()) < 1e-12, r["rel_err"]


def test_peers_that_cannot_run_say_why():
    r = _run(2, ["--model", "qwenimage", "--height", "64", "--width", "64", "--text-len", "8", "--peers", "usp",
                 "diffusers-ring", "diffusers-unified"])
    notes = " ".join(r["notes"])
    assert set(r["ms"]) == {"1gpu", "sfattn"}
    assert "usp skipped: yunchang runs only pure Ulysses on CPUs" in notes
    assert "diffusers-ring skipped: diffusers' ring needs a log-sum-exp" in notes


def test_usp_on_cpus_with_heads_that_divide():
    pytest.importorskip("yunchang")
    r = _run(2, ["--model", "flux", "--heads", "4", "--height", "64", "--width", "64", "--text-len", "8",
                 "--peers", "usp", "--compile", "--compile-backend", "aot_eager"])
    assert set(r["ms"]) == {"1gpu", "sfattn", "usp"}
    assert r["describe"]["usp"] == "yunchang USP U2xR1 torch_math"
    assert "ulysses" in r["describe"]["sfattn"]
    assert max(r["rel_err"]["sfattn"].values()) < 1e-12, r["rel_err"]
    assert max(r["rel_err"]["usp"].values()) < 1e-5, r["rel_err"]  # yunchang accumulates in float32
    assert r["graphs"] == {"1gpu": 1, "sfattn": 2, "usp": 2}  # + the pre-hook's frame


def test_summary_keys_only_from_the_runs_that_define_them(tmp_path):
    import dit_sp

    path = tmp_path / "summary.json"
    path.write_text('{"other": 1}\n')
    res = dict(ranks=2, device="NVIDIA H200", shared_gpu=False, ok=True, speedup=1.91234, over_usp=1.05,
               ms={"1gpu": 10.0, "sfattn": 10.3})
    full = dit_sp.parse_args(["--model", "flux", "--size", "4096"])
    for argv, change in ((["--model", "flux", "--tiny"], {}), (["--model", "flux", "--size", "2048"], {}),
                         (["--model", "wan"], {}), (["--model", "flux", "--size", "4096"], {"device": "cpu"}),
                         (["--model", "flux", "--size", "4096"], {"shared_gpu": True}),
                         (["--model", "flux", "--size", "4096", "--depth", "1"], {}),
                         (["--model", "flux", "--size", "4096"], {"ranks": 4}),
                         (["--model", "flux", "--size", "1024"], {"shared_gpu": True}),  # not compiled
                         (["--model", "flux", "--size", "4096"], {"ok": False})):
        assert "not written" in dit_sp.write_summary(dit_sp.parse_args(argv), dict(res, **change), str(path))
    assert json.loads(path.read_text()) == {"other": 1}
    dit_sp.write_summary(full, res, str(path))
    assert json.loads(path.read_text()) == {"other": 1, "e2e_flux4096_2gpu_speedup": 1.912,
                                            "e2e_flux4096_over_usp": 1.05, "e2e_card": "NVIDIA H200"}
    dit_sp.write_summary(dit_sp.parse_args(["--model", "flux", "--size", "1024", "--compile", "--compile-mode",
                                            "reduce-overhead"]),
                         dict(res, shared_gpu=True, compile="inductor reduce-overhead"), str(path))
    got = json.loads(path.read_text())
    assert got["e2e_flux1024_2ranks_1gpu_over_1rank"] == 1.03 and got["e2e_flux1024_compile"] == "inductor reduce-overhead"


def test_example_rejects_bad_arguments(capsys):
    import dit_sp

    for argv, msg in ((["--size", "1000"], "flux: 1000x1000 px must be multiples of 16"),
                      (["--model", "wan", "--frames", "80"], "wan: 80 frames must be 4k+1"),
                      (["--steps", "0"], "--steps 0: expected >= 1")):
        with pytest.raises(SystemExit):
            dit_sp.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_cuda_graph_needs_gpus():
    argv = ["--model", "flux", "--tiny", "--cuda-graph", "--dist-init", f"tcp://127.0.0.1:{free_port()}"]
    (status, value), = run_ranks(_example, 1, heap="16MiB", deadline=60, timeout=30, argv=argv)
    assert status == "err" and value[0] == "ValueError" and "--cuda-graph: needs GPUs" in value[1], value
