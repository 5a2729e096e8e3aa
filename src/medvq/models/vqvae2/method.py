"""The VQ-VAE-2: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae2.config import VQVAE2Config

MAP_NAMES = ("residual", "alm_top", "alm_bottom", "perceptual")


def map_names_for(config: VQVAE2Config) -> tuple[str, ...]:
    """The perceptual map needs the frozen ImageNet network: only runs trained with ``--perceptual-map`` have it (off by default)."""
    return MAP_NAMES if config.perceptual_map else tuple(n for n in MAP_NAMES if n != "perceptual")


METHOD = Method(
    summary="VQ-VAE-2 (top and bottom codes) for MRI and OCT reconstruction; SSIM/PSNR, residual, per-level ALM and perceptual residual.",
    order=1,
    config=VQVAE2Config,
    map_names=MAP_NAMES,
    maps_for=map_names_for,
    primary_map="residual",
    metrics=("reconstruction",),
    channels_last=True,
    stored_model_defaults={"upsampling": "transpose", "perceptual_map": False},  # what runs from before each option have
    onnx_export=lambda model: True,
)
