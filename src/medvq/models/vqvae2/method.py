"""The VQ-VAE-2: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae.method import without_missing_perceptual
from medvq.models.vqvae2.config import VQVAE2Config

MAP_NAMES = ("residual", "alm_top", "alm_bottom", "perceptual")


def map_names_for(config: VQVAE2Config) -> tuple[str, ...]:
    return without_missing_perceptual(MAP_NAMES, config.perceptual_map)  # only with --perceptual-map (off by default)


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
