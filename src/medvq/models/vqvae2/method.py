"""The VQ-VAE-2 declares itself: config, maps, how it is built and trained, what it can do (see ``medvq.models.registry``)."""

from medvq.models.registry import Method, lazy_in
from medvq.models.vqvae2.config import VQVAE2Config

ref = lazy_in(__package__)
MAP_NAMES = ("residual", "alm_top", "alm_bottom")

METHOD = Method(
    name="vqvae2",
    summary="VQ-VAE-2 (top and bottom codes) for MRI and OCT reconstruction; SSIM/PSNR, residual and per-level ALM.",
    order=1,
    config=VQVAE2Config,
    map_names=MAP_NAMES,
    build_model=ref("model:VQVAE2"),
    compute_maps=ref("anomaly_map:vqvae2_maps"),
    training_module=ref("lightning:VQVAE2Module.from_run_config"),
    primary_map="residual",
    metrics=("reconstruction",),
    channels_last=True,
    stored_model_defaults={"upsampling": "transpose"},
    onnx_export=lambda model: True,
)
