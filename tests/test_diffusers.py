"""Tiny Flux and Wan transformers, sequence-parallel over 2 host-backend ranks, equal one process.

Also the end-to-end example (examples/dit_sp.py) on its tiny configurations: sfattn and the
yunchang USP baseline (over gloo) against one rank, eager and compiled with fullgraph=True.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ranks import all_ok, run_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=False,
                                  axes_dims_rope=(4, 6, 6)).to(torch.float64).eval()


def _inputs(n_img: int = 24, n_txt: int = 8):
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(n_img // 4.0),
                                         indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(1, n_img, 8, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g, dtype=torch.float64),
                pooled_projections=torch.randn(1, 16, generator=g, dtype=torch.float64),
                timestep=torch.tensor([0.5], dtype=torch.float64),
                img_ids=img_ids.to(torch.float64), txt_ids=torch.zeros(n_txt, 3, dtype=torch.float64))


def _flux_sp(rt, algorithm):
    from sfattn.integrations.diffusers import SequenceParallel

    model, x = _tiny_flux(), _inputs()
    with torch.no_grad():
        ref = model(**x).sample
        sp = SequenceParallel(rt, algorithm=algorithm)
        sp.apply_flux(model)
        local = dict(x, hidden_states=sp.shard(x["hidden_states"]), img_ids=sp.shard(x["img_ids"], dim=0))
        out = sp.gather(model(**local).sample)
        out2 = sp.gather(model(**local).sample)  # buffers reused, same result
    sp.close()
    err = float((out - ref).abs().max() / ref.abs().max())
    return err, bool(torch.equal(out, out2)), tuple(out.shape)


@pytest.mark.parametrize("algorithm", ["ulysses", "ring", "torus"])
def test_tiny_flux_sequence_parallel_matches_one_process(algorithm):
    machines = 2 if algorithm == "torus" else 1
    res = all_ok(run_ranks(_flux_sp, 2, machines=machines, heap="16MiB", deadline=180, timeout=120,
                           algorithm=algorithm))
    for err, same, shape in res:
        assert shape == (1, 24, 8)
        assert err < 1e-10, err
        assert same


def _bad_shard(rt):
    from sfattn.integrations.diffusers import SequenceParallel

    sp = SequenceParallel(rt)
    with pytest.raises(ValueError, match="25 tokens do not divide by the 2 ranks"):
        sp.shard(torch.zeros(1, 25, 4))
    return True


def test_shard_refuses_uneven_sequences():
    all_ok(run_ranks(_bad_shard, 2))


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).to(torch.float64).eval()


def _wan_sp(rt, algorithm):
    from sfattn.integrations.diffusers import SequenceParallel

    model = _tiny_wan()
    g = torch.Generator().manual_seed(2)
    x = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g, dtype=torch.float64),  # 3 x 4 x 4 tokens
             timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 8, 16, generator=g, dtype=torch.float64))
    with torch.no_grad():
        ref = model(**x).sample
        sp = SequenceParallel(rt, algorithm=algorithm)
        hooks = sp.apply_wan(model)
        out = model(**x).sample
    for h in hooks:
        h.remove()
    sp.close()
    return float((out - ref).abs().max() / ref.abs().max()), tuple(out.shape)


@pytest.mark.parametrize("algorithm", ["ulysses", "torus"])
def test_tiny_wan_sequence_parallel_matches_one_process(algorithm):
    res = all_ok(run_ranks(_wan_sp, 2, machines=2 if algorithm == "torus" else 1, heap="16MiB", deadline=180,
                           timeout=120, algorithm=algorithm))
    for err, shape in res:
        assert shape == (1, 4, 3, 8, 8)
        assert err < 1e-10, err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _example(rt, argv):
    import dit_sp

    return dit_sp.run(rt, dit_sp.parse_args(argv))


@pytest.mark.parametrize("model,compiled", [("flux", True), ("wan", False), ("wan", True)])
def test_dit_example_tiny_sfattn_and_usp_match_one_rank(model, compiled):
    """The example's path: Euler steps of the tiny model on 1 rank, with sfattn and with USP on 2."""
    pytest.importorskip("yunchang")
    argv = ["--model", model, "--tiny", "--steps", "2", "--dist-init", f"tcp://127.0.0.1:{_free_port()}"]
    if compiled:  # fullgraph=True: a graph break anywhere (attention, gathers, hooks) raises
        argv += ["--compile", "--compile-backend", "aot_eager"]
    res = all_ok(run_ranks(_example, 2, heap="16MiB", deadline=240, timeout=200, argv=argv))
    r = res[0]
    assert r["ok"], r["failures"]
    assert set(r["ms"]) == {"1gpu", "sfattn", "usp"}
    assert r["usp"] == "yunchang USP U2xR1 torch_math"
    assert max(r["rel_err"]["sfattn"].values()) < 1e-9, r["rel_err"]
    assert max(r["rel_err"]["usp"].values()) < 1e-5, r["rel_err"]  # yunchang accumulates in float32
    if compiled:  # one graph per run: no break, no recompilation between steps
        assert r["graphs"] == {"1gpu": 1, "sfattn": 1, "usp": 1}
    else:
        assert "graphs" not in r


def _usp_ring_on_cpu(rt, port):
    import dit_sp
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rt.rank, world_size=2)
    try:
        with pytest.raises(ValueError, match="only pure Ulysses on CPUs"):
            dit_sp.USPBaseline(rt, heads=4, ulysses_degree=1)
        with pytest.raises(ValueError, match="ulysses_degree=3: must divide the 2 ranks and the 4 heads"):
            dit_sp.USPBaseline(rt, heads=4, ulysses_degree=3)
    finally:
        dist.destroy_process_group()
    return True


def test_usp_baseline_refuses_what_yunchang_cannot_do_on_cpus():
    pytest.importorskip("yunchang")
    all_ok(run_ranks(_usp_ring_on_cpu, 2, port=_free_port(), deadline=120))


def test_summary_keys_only_from_full_width_flux4096_on_two_gpus(tmp_path):
    import dit_sp

    path = tmp_path / "summary.json"
    path.write_text('{"other": 1}\n')
    res = dict(ranks=2, device="NVIDIA H200", shared_gpu=False, ok=True, speedup=1.91234, over_usp=1.05)
    full = dit_sp.parse_args(["--model", "flux", "--size", "4096"])
    for argv, change in ((["--model", "flux", "--tiny"], {}), (["--model", "flux", "--size", "2048"], {}),
                         (["--model", "wan"], {}), (["--model", "flux", "--size", "4096"], {"device": "cpu"}),
                         (["--model", "flux", "--size", "4096"], {"shared_gpu": True}),
                         (["--model", "flux", "--size", "4096"], {"ranks": 4}),
                         (["--model", "flux", "--size", "4096"], {"ok": False})):
        assert "not written" in dit_sp.write_summary(dit_sp.parse_args(argv), dict(res, **change), str(path))
    assert json.loads(path.read_text()) == {"other": 1}
    dit_sp.write_summary(full, res, str(path))
    assert json.loads(path.read_text()) == {"other": 1, "e2e_flux4096_2gpu_speedup": 1.912,
                                            "e2e_flux4096_over_usp": 1.05}


def test_example_rejects_bad_arguments(capsys):
    import dit_sp

    for argv, msg in ((["--size", "1000"], "--size 1000: must be a multiple of 16"),
                      (["--frames", "80"], "--frames 80: must be 4k+1"),
                      (["--steps", "0"], "--steps 0: expected >= 1")):
        with pytest.raises(SystemExit):
            dit_sp.parse_args(argv)
        assert msg in capsys.readouterr().err
