"""The VQ-VAE declares itself: config, maps, how it is built and trained, what it can do (see ``medvq.models.registry``)."""

from medvq.models.registry import Method, lazy_in
from medvq.models.vqvae.config import VQVAEConfig

ref = lazy_in(__package__)
MAP_NAMES = ("residual", "alm")

METHOD = Method(
    name="vqvae",
    summary="VQ-VAE trained on normal scans; reconstruction residual and alignment loss map (ALM).",
    order=0,
    config=VQVAEConfig,
    map_names=MAP_NAMES,
    build_model=ref("model:VQVAE"),
    compute_maps=ref("anomaly_map:vqvae_maps"),
    training_module=ref("lightning:VQVAEModule.from_run_config"),
    primary_map="residual",
    metrics=("reconstruction",),
    channels_last=True,
    onnx_export=lambda model: True,
)
