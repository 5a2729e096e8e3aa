"""The VQ-VAE: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae.config import VQVAEConfig

MAP_NAMES = ("residual", "alm", "perceptual")


def map_names_for(config: VQVAEConfig) -> tuple[str, ...]:
    """The perceptual map needs the frozen ImageNet network, which runs from before it (and ``--no-perceptual-map``) lack."""
    return MAP_NAMES if config.perceptual_map else ("residual", "alm")


METHOD = Method(
    summary="VQ-VAE trained on normal scans; reconstruction residual, alignment loss map (ALM) and perceptual residual (ImageNet features).",
    order=0,
    config=VQVAEConfig,
    map_names=MAP_NAMES,
    maps_for=map_names_for,
    stored_model_defaults={"perceptual_map": False},  # runs from before the perceptual map hold no feature network
    primary_map="perceptual",  # where the validation patients hold no abnormal scan to choose on (docs/results.md)
    metrics=("reconstruction",),
    channels_last=True,
    onnx_export=lambda model: True,
)
