"""The VQ-VAE: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae.config import VQVAEConfig

MAP_NAMES = ("residual", "alm")

METHOD = Method(
    summary="VQ-VAE trained on normal scans; reconstruction residual and alignment loss map (ALM).",
    order=0,
    config=VQVAEConfig,
    map_names=MAP_NAMES,
    primary_map="residual",
    metrics=("reconstruction",),
    channels_last=True,
    onnx_export=lambda model: True,
)
