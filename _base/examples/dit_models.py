"""A small zoo of diffusers DiT families that carry a context-parallel plan (``_cp_plan``).

Each :class:`Family` knows how to build its transformer with random weights, either ``tiny``
(float64 on a CPU in milliseconds, for tests) or at the published model's width with few
blocks (for benchmarks), how to make one forward call's conditioning at any resolution, and
how to call the model::

    fam = FAMILIES["flux"]
    cfg = fam.config(tiny=True)
    model = fam.build(cfg, torch.float64)
    res = Res(height=5, width=7, text=7)                  # sizes in latent tokens
    g = torch.Generator().manual_seed(0)
    cond = fam.inputs(cfg, res, torch.float64, "cpu", g)
    latents = torch.randn(fam.latent_shape(cfg, res), generator=g, dtype=torch.float64)
    velocity = fam.forward(model, latents, 0.5, cond)     # same shape as latents

Latents are in the layout the diffusers pipeline denoises in: packed tokens ``(B, tokens,
channels)`` for Flux, Flux.2, Qwen-Image and LTX-Video (2x2 latent pixels per token for the
first three, the pipeline's ``_pack_latents``), the 5-D VAE latents ``(B, C, F, H, W)`` for Wan,
whose transformer patchifies itself. Every family takes its timestep the way its pipeline
passes it: sigma in [0, 1] for the Flux and Qwen families (they scale by 1000 inside), sigma x
1000 for Wan and LTX-Video.

Resolutions are counted in *latent tokens* (after the VAE and the patch embedding): any
positive height, width, frames and text length is accepted, e.g. 65 x 65 = 4225 Flux tokens
(a 1040 x 1040 image) or 5 x 7 tokens and 7 text tokens for a tiny model.
:meth:`Family.res_from_pixels` converts a pixel size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Res", "Family", "FAMILIES", "num_params"]


@dataclass(frozen=True)
class Res:
    """One generation size, in latent tokens.

    ``height`` x ``width`` tokens per frame, ``frames`` latent frames (videos only), ``text``
    text tokens, of which the last ``text_pad`` are padding: masked out for the families that
    take a text mask (Qwen-Image, LTX-Video), ordinary tokens for the others. ``batch`` samples.
    """

    height: int
    width: int
    frames: int = 1
    text: int = 7
    text_pad: int = 0
    batch: int = 1

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.frames, self.text, self.batch) < 1:
            raise ValueError(f"{self}: sizes must be >= 1")
        if not 0 <= self.text_pad < self.text:
            raise ValueError(f"{self}: need 0 <= text_pad < text")


Tensors = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """A diffusers transformer class and what it takes to run it.

    ``cls``: the diffusers class name. ``source``: the published checkpoint whose width
    ``config(tiny=False)`` mirrors. ``px_per_token``: image pixels per latent token along height
    and width (VAE x patch); ``frames_per_token``: video frames per latent frame (0: images).
    ``timestep_scale``: the model's timestep is ``sigma * timestep_scale``. ``text_mask``: the
    conditioning carries a text mask (``Res.text_pad`` matters).
    """

    name: str
    cls: str
    source: str
    px_per_token: int
    frames_per_token: int
    timestep_scale: float
    text_mask: bool
    _config: Callable[[bool, int], dict[str, Any]] = field(repr=False)
    _default_depth: tuple[int, int] = field(repr=False)  # (tiny, full)
    _latent_shape: Callable[[dict[str, Any], Res], tuple[int, ...]] = field(repr=False)
    _inputs: Callable[[dict[str, Any], Res, Callable[..., torch.Tensor]], Tensors] = field(repr=False)

    @property
    def video(self) -> bool:
        return self.frames_per_token > 0

    def config(self, tiny: bool, depth: int | None = None) -> dict[str, Any]:
        """Constructor kwargs: ``tiny`` (a few heads of 16 channels) or the published width.

        ``depth``: transformer blocks; for Flux-style models ``depth`` double-stream blocks and
        ``2 * depth`` single-stream ones. Default: 1 (Flux-style) or 2 tiny, 2 (2+4) or 4 full.
        """
        depth = self._default_depth[0 if tiny else 1] if depth is None else depth
        if depth < 1:
            raise ValueError(f"depth {depth}: expected >= 1")
        return self._config(tiny, depth)

    def model_class(self) -> type[torch.nn.Module]:
        import diffusers

        return getattr(diffusers, self.cls)

    def build(self, cfg: dict[str, Any], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> torch.nn.Module:
        """The transformer with seeded random weights (identical in every process), in eval mode.

        In half precision the modules diffusers keeps in float32 when loading
        (``_keep_in_fp32_modules``) stay float32, as with ``from_pretrained(torch_dtype=...)``.
        """
        torch.manual_seed(seed)
        with torch.device(device):
            model = self.model_class()(**cfg).eval()
        half = dtype in (torch.float16, torch.bfloat16)
        keep = (getattr(model, "_keep_in_fp32_modules", None) or []) if half else []
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not any(k in name.split(".") for k in keep):
                t.data = t.data.to(dtype)
        return model

    def latent_shape(self, cfg: dict[str, Any], res: Res) -> tuple[int, ...]:
        """Shape of the latents (the model's ``hidden_states``) at ``res``."""
        if res.frames != 1 and not self.video:
            raise ValueError(f"{self.name} makes images: frames must be 1, got {res.frames}")
        return self._latent_shape(cfg, res)

    def inputs(self, cfg: dict[str, Any], res: Res, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensors:
        """The keyword arguments of a forward call other than the latents and the timestep:
        random text embeddings (from ``generator``, on the CPU, then moved) and positions."""
        self.latent_shape(cfg, res)  # validates res

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

        cond = self._inputs(cfg, res, randn)
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                if isinstance(v, torch.Tensor) else v for k, v in cond.items()}

    def forward(self, model: Callable[..., Any], latents: torch.Tensor, sigma: float, cond: Tensors) -> torch.Tensor:
        """The model's velocity prediction at noise level ``sigma``, shaped like ``latents``.

        The timestep is float32 (float64 with float64 latents), as the schedulers make it."""
        return self.call(model, latents, self.timestep(latents, sigma), cond)

    def timestep(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model's ``timestep`` argument at noise level ``sigma``, one per sample."""
        dtype = torch.promote_types(latents.dtype, torch.float32)
        return torch.full((latents.shape[0],), sigma * self.timestep_scale, device=latents.device, dtype=dtype)

    @staticmethod
    def call(model: Callable[..., Any], latents: torch.Tensor, t: torch.Tensor, cond: Tensors) -> torch.Tensor:
        """The model's output at timestep tensor ``t`` (see :meth:`timestep`)."""
        return model(hidden_states=latents, timestep=t, **cond, return_dict=False)[0]

    def tokens(self, res: Res) -> tuple[int, int]:
        """(image/video tokens, text tokens) of one sample at ``res``."""
        return res.frames * res.height * res.width, res.text

    def res_from_pixels(self, height: int, width: int, frames: int = 1, **kw: int) -> Res:
        """The :class:`Res` of a ``height`` x ``width`` pixel image (``frames`` video frames)."""
        p = self.px_per_token
        if height % p or width % p:
            raise ValueError(f"{self.name}: {height}x{width} px must be multiples of {p}")
        f = self.frames_per_token
        if f and (frames - 1) % f:
            raise ValueError(f"{self.name}: {frames} frames must be {f}k+1")
        return Res(height // p, width // p, (frames - 1) // f + 1 if f else 1, **kw)


# -- shared pieces --------------------------------------------------------------------------
def _text_mask(res: Res) -> torch.Tensor:
    """(B, text) of ones, zeros on the trailing ``text_pad`` tokens."""
    mask = torch.ones(res.batch, res.text, dtype=torch.int64)
    mask[:, res.text - res.text_pad:] = 0
    return mask


def _grid(*sizes: int) -> torch.Tensor:
    """(prod(sizes), len(sizes)) integer coordinates, the last axis fastest."""
    return torch.cartesian_prod(*(torch.arange(s) for s in sizes)).reshape(-1, len(sizes))


def _tiny_or(tiny: bool, small: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    return small if tiny else full


# -- Flux.1 ---------------------------------------------------------------------------------
def _flux_config(tiny: bool, depth: int) -> dict[str, Any]:
    return dict(patch_size=1, num_layers=depth, num_single_layers=2 * depth, guidance_embeds=True, **_tiny_or(
        tiny,
        dict(in_channels=8, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
             pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        dict(in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))))


def _flux_inputs(cfg: dict[str, Any], res: Res, randn: Callable[..., torch.Tensor]) -> Tensors:
    img_ids = torch.cat([torch.zeros(res.height * res.width, 1, dtype=torch.int64), _grid(res.height, res.width)], 1)
    return dict(encoder_hidden_states=randn(res.batch, res.text, cfg["joint_attention_dim"]),
                pooled_projections=randn(res.batch, cfg["pooled_projection_dim"]),
                img_ids=img_ids.double(), txt_ids=torch.zeros(res.text, 3, dtype=torch.float64),
                guidance=torch.full((res.batch,), 3.5, dtype=torch.float64))


# -- Flux.2 ---------------------------------------------------------------------------------
def _flux2_config(tiny: bool, depth: int) -> dict[str, Any]:
    return dict(patch_size=1, num_layers=depth, num_single_layers=2 * depth, guidance_embeds=True, **_tiny_or(
        tiny,
        dict(in_channels=8, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
             timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)),
        dict(in_channels=128, attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
             timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32))))


def _flux2_inputs(cfg: dict[str, Any], res: Res, randn: Callable[..., torch.Tensor]) -> Tensors:
    # the pipeline's integer (t, h, w, layer) position ids: images at t = layer = 0, text along the layer axis
    z = torch.zeros(res.height * res.width, 1, dtype=torch.int64)
    img_ids = torch.cat([z, _grid(res.height, res.width), z], 1)
    txt_ids = torch.cat([torch.zeros(res.text, 3, dtype=torch.int64), _grid(res.text)], 1)
    return dict(encoder_hidden_states=randn(res.batch, res.text, cfg["joint_attention_dim"]),
                img_ids=img_ids.expand(res.batch, -1, -1), txt_ids=txt_ids.expand(res.batch, -1, -1),  # int64
                guidance=torch.full((res.batch,), 4.0, dtype=torch.float64))


def _packed_shape(cfg: dict[str, Any], res: Res) -> tuple[int, ...]:
    return (res.batch, res.height * res.width, cfg["in_channels"])


# -- Qwen-Image -----------------------------------------------------------------------------
def _qwen_config(tiny: bool, depth: int) -> dict[str, Any]:
    return dict(patch_size=2, num_layers=depth, guidance_embeds=False, **_tiny_or(
        tiny,
        dict(in_channels=8, out_channels=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
             axes_dims_rope=(4, 6, 6)),
        dict(in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))))


def _qwen_inputs(cfg: dict[str, Any], res: Res, randn: Callable[..., torch.Tensor]) -> Tensors:
    mask = _text_mask(res)
    return dict(encoder_hidden_states=randn(res.batch, res.text, cfg["joint_attention_dim"]),
                # the pipeline drops an all-ones mask
                encoder_hidden_states_mask=mask if res.text_pad else None,
                img_shapes=[[(1, res.height, res.width)]] * res.batch)


# -- Wan 2.1 --------------------------------------------------------------------------------
def _wan_config(tiny: bool, depth: int) -> dict[str, Any]:
    return dict(patch_size=(1, 2, 2), num_layers=depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, **_tiny_or(
                    tiny,
                    dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
                         freq_dim=16, ffn_dim=32, rope_max_seq_len=64),
                    dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                         text_dim=4096, freq_dim=256, ffn_dim=13824, rope_max_seq_len=1024)))


def _wan_shape(cfg: dict[str, Any], res: Res) -> tuple[int, ...]:
    _, ph, pw = cfg["patch_size"]
    return (res.batch, cfg["in_channels"], res.frames, res.height * ph, res.width * pw)


def _wan_inputs(cfg: dict[str, Any], res: Res, randn: Callable[..., torch.Tensor]) -> Tensors:
    return dict(encoder_hidden_states=randn(res.batch, res.text, cfg["text_dim"]))


# -- LTX-Video ------------------------------------------------------------------------------
LTX_FRAME_RATE = 25


def _ltx_config(tiny: bool, depth: int) -> dict[str, Any]:
    heads, head_dim = (3, 16) if tiny else (32, 64)
    return dict(patch_size=1, patch_size_t=1, num_layers=depth, num_attention_heads=heads, attention_head_dim=head_dim,
                cross_attention_dim=heads * head_dim,  # K/V of the projected captions, inner_dim wide
                **_tiny_or(tiny, dict(in_channels=8, out_channels=8, caption_channels=24),
                           dict(in_channels=128, out_channels=128, caption_channels=4096)))


def _ltx_shape(cfg: dict[str, Any], res: Res) -> tuple[int, ...]:
    return (res.batch, res.frames * res.height * res.width, cfg["in_channels"])


def _ltx_inputs(cfg: dict[str, Any], res: Res, randn: Callable[..., torch.Tensor]) -> Tensors:
    # the pipeline's RoPE scale: (VAE temporal ratio / fps, VAE spatial ratio, VAE spatial ratio)
    return dict(encoder_hidden_states=randn(res.batch, res.text, cfg["caption_channels"]),
                encoder_attention_mask=_text_mask(res),  # the pipeline always passes it
                num_frames=res.frames, height=res.height, width=res.width,
                rope_interpolation_scale=(8 / LTX_FRAME_RATE, 32, 32))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("flux", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-dev", px_per_token=16, frames_per_token=0,
           timestep_scale=1.0, text_mask=False, _config=_flux_config, _default_depth=(1, 2),
           _latent_shape=_packed_shape, _inputs=_flux_inputs),
    Family("flux2", "Flux2Transformer2DModel", "black-forest-labs/FLUX.2-dev", px_per_token=16, frames_per_token=0,
           timestep_scale=1.0, text_mask=False, _config=_flux2_config, _default_depth=(1, 2),
           _latent_shape=_packed_shape, _inputs=_flux2_inputs),
    Family("qwenimage", "QwenImageTransformer2DModel", "Qwen/Qwen-Image", px_per_token=16, frames_per_token=0,
           timestep_scale=1.0, text_mask=True, _config=_qwen_config, _default_depth=(2, 4),
           _latent_shape=_packed_shape, _inputs=_qwen_inputs),
    Family("wan", "WanTransformer3DModel", "Wan-AI/Wan2.1-T2V-14B-Diffusers", px_per_token=16, frames_per_token=4,
           timestep_scale=1000.0, text_mask=False, _config=_wan_config, _default_depth=(2, 4),
           _latent_shape=_wan_shape, _inputs=_wan_inputs),
    Family("ltx", "LTXVideoTransformer3DModel", "Lightricks/LTX-Video (2B, 0.9.x)", px_per_token=32,
           frames_per_token=8, timestep_scale=1000.0, text_mask=True, _config=_ltx_config, _default_depth=(2, 4),
           _latent_shape=_ltx_shape, _inputs=_ltx_inputs),
]}


def num_params(model: torch.nn.Module) -> int:
    """Parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # a one-line summary per family: tiny forward on the CPU
    import time

    for fam in FAMILIES.values():
        cfg = fam.config(tiny=True)
        model = fam.build(cfg, torch.float64)
        res = Res(height=5, width=7, frames=3 if fam.video else 1, text=7)
        g = torch.Generator().manual_seed(0)
        cond = fam.inputs(cfg, res, torch.float64, "cpu", g)
        x = torch.randn(fam.latent_shape(cfg, res), generator=g, dtype=torch.float64)
        t0 = time.perf_counter()
        with torch.no_grad():
            v = fam.forward(model, x, 0.5, cond)
        ms = 1e3 * (time.perf_counter() - t0)
        assert v.shape == x.shape, (fam.name, v.shape, x.shape)
        print(f"{fam.name:10s} {fam.cls:30s} {num_params(model):7d} params, tokens {fam.tokens(res)}, "
              f"latents {tuple(x.shape)}, {ms:.1f} ms")
