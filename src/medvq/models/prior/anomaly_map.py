"""A prior's anomaly maps: NLL of the VQ-VAE's codes under the prior, plus the frozen VQ-VAE's own maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.maps.nll import code_nll
from medvq.models.prior.model import LatentPrior
from medvq.models.vqvae import anomaly_map as vqvae_anomaly_map
from medvq.models.prior.method import MAP_NAMES, COMBINATIONS, map_names_for  # noqa: F401 (declared with the method)


def nll_map(logits: torch.Tensor, codes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """-log p(k*(i, j) | context) per latent position, (B, 1, h, w), upsampled bilinearly to ``size`` like the ALM."""
    nll = code_nll(logits, codes)[:, None]
    if size is not None and tuple(nll.shape[-2:]) != tuple(size):
        nll = F.interpolate(nll, size=size, mode="bilinear", align_corners=False)
    return nll


@torch.no_grad()
def compute_maps(model: LatentPrior, images: torch.Tensor, names: tuple[str, ...] | list[str] | None = None) -> MapOutput:
    """(B, 1, S, S) images in [0, 1] -> nll and the frozen VQ-VAE's maps (default: all); one teacher-forced pass of the prior."""
    available = map_names_for(model.config)
    names = available if names is None else names
    check_map_names(names, available, "a prior")
    with evaluating(model):
        out = vqvae_anomaly_map.compute_maps(model.vqvae, images, [n for n in names if n != "nll"])  # also gives the code maps
        if "nll" in names:
            logits = model.logits(images, out.codes)
            out.maps = {"nll": nll_map(logits, out.codes, tuple(images.shape[-2:])), **out.maps}
    return out
