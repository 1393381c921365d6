"""Tiny Flux and Wan transformers, sequence-parallel over 2 host-backend ranks, equal one process."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ranks import all_ok, run_ranks  # noqa: E402


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
