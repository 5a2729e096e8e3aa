"""The VQ-VAE: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae.config import VQVAEConfig

MAP_NAMES = ("residual", "alm", "perceptual")


def without_missing_perceptual(names: tuple[str, ...], perceptual_map: bool) -> tuple[str, ...]:
    """``names`` less 'perceptual' where the autoencoder was built without the map's frozen network (runs from
    before it, ``--no-perceptual-map``): what the VQ-VAE, the VQ-VAE-2 and a prior on a VQ-VAE can compute."""
    return names if perceptual_map else tuple(n for n in names if n != "perceptual")


def map_names_for(config: VQVAEConfig) -> tuple[str, ...]:
    return without_missing_perceptual(MAP_NAMES, config.perceptual_map)


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
