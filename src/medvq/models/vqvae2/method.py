"""The VQ-VAE-2: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.registry import Method
from medvq.models.vqvae2.config import VQVAE2Config

MAP_NAMES = ("residual", "alm_top", "alm_bottom")

METHOD = Method(
    summary="VQ-VAE-2 (top and bottom codes) for MRI and OCT reconstruction; SSIM/PSNR, residual and per-level ALM.",
    order=1,
    config=VQVAE2Config,
    map_names=MAP_NAMES,
    primary_map="residual",
    metrics=("reconstruction",),
    channels_last=True,
    stored_model_defaults={"upsampling": "transpose"},
    onnx_export=lambda model: True,
)
