"""The latent prior: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.prior.config import PriorConfig
from medvq.models.registry import Dependency, Method, lazy_in
from medvq.models.vqvae.method import without_missing_perceptual

ref = lazy_in(__package__)
MAP_NAMES = ("nll", "residual", "alm", "perceptual")
COMBINATIONS = ("nll+alm", "nll+residual", "alm+residual", "nll+perceptual")


def map_names_for(config: PriorConfig) -> tuple[str, ...]:
    return without_missing_perceptual(MAP_NAMES, config.vqvae_config is None or config.vqvae_config.perceptual_map)


def sampling(config: PriorConfig) -> tuple[str, str] | None:
    """Only the autoregressive prior draws new code maps: None, or why not and the fix."""
    if config.kind != "autoregressive":
        return "is a fusion prior: it predicts codes from an image and cannot draw new ones", "train `medvq train prior --kind autoregressive` to sample"
    return None


METHOD = Method(
    summary="Latent prior over a trained VQ-VAE's codes (--vqvae RUNDIR): fusion (frozen encoder features -> conv net) or autoregressive transformer; NLL map, sampling.",
    order=4,
    config=PriorConfig,
    map_names=MAP_NAMES,
    maps_for=map_names_for,
    depends_on=(Dependency(method="vqvae", field="vqvae_run"),),
    prepare=ref("training:prepare_prior"),
    primary_map="nll",
    combinations=COMBINATIONS,
    sampling=sampling,
)
