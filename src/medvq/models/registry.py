"""The methods medvq can train, and how each one is built, trained and turned into anomaly maps.

A method is registered once here; the CLI (`medvq train <name>`), the training engine, the Detector and
evaluation all look it up by the `method:` field of a run's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # the registry itself stays light: `medvq --help` lists methods without loading torch
    import torch
    from torch import nn

    from medvq.maps import MapOutput


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    map_names: tuple[str, ...]  # maps the method can compute, in report order
    build_model: Callable[..., nn.Module]  # (model config) -> pure nn.Module
    compute_maps: Callable[[nn.Module, torch.Tensor, Sequence[str]], MapOutput]
    training_module: Callable[..., "object"] | None  # (RunConfig) -> LightningModule with .model and .epoch_summary(); None for fit-only methods
    normal_only: bool = True  # trains on the normal class only (unsupervised)
    # Supervised methods (normal_only=False) train on every class of the training patients and say how:
    maps_for: Callable[..., tuple[str, ...]] | None = None  # (model config) -> maps this configuration can give (default: map_names)
    resolve_config: Callable[..., "object"] | None = None  # (RunConfig, training labels) -> RunConfig with data-dependent fields set
    targets: Callable[..., list[int]] | None = None  # (RunConfig, class names) -> integer training targets
    # Methods without gradient training (a memory bank) fit in one pass instead of the Lightning trainer:
    fit: Callable[..., tuple[nn.Module, dict]] | None = None  # (RunConfig, train ScanDataset, device=, console=, progress=) -> (model, summary)
    # Methods built on another run (a prior on a VQ-VAE) complete their config and take that run's patient split:
    prepare: Callable[..., tuple["object", dict]] | None = None  # (RunConfig, data root, RunDir) -> (RunConfig, {'train', 'val', 'test'} -> samples)
    # The map (or model score) that decides when the validation patients hold no abnormal scans to choose on:
    # the method's best on kermany-dev and the phantom (README, Results); None: 'combined', else the first map.
    primary_map: str | None = None
    streams_training: bool = False  # reads training scans from disk batch by batch (memory independent of their number) instead of holding them
    combinations: tuple[str, ...] = ()  # named combinations 'a+b' calibrated next to 'combined' (the mean of the standardised maps a and b)
    # Model fields added after runs were saved, with the value a saved config.yaml without them means (every run's
    # config.yaml holds every field of its time, so a missing one marks an older run, not a wish for today's default):
    stored_model_defaults: dict[str, Any] = field(default_factory=dict)
    # Methods whose scoring path traces into one ONNX graph (`medvq export`): prepares the loaded model for
    # tracing and says whether the graph takes any batch size (else it is exported for one scan at a time).
    onnx_export: Callable[[nn.Module], bool] | None = None

    def maps(self, model_config) -> tuple[str, ...]:
        """The maps a model built from ``model_config`` computes by default."""
        return self.maps_for(model_config) if self.maps_for is not None else self.map_names


def _vqvae() -> Method:
    from medvq.models.vqvae.anomaly_map import MAP_NAMES, vqvae_maps
    from medvq.models.vqvae.lightning import VQVAEModule
    from medvq.models.vqvae.model import VQVAE

    return Method(
        name="vqvae",
        summary=SUMMARIES["vqvae"],
        map_names=MAP_NAMES,
        build_model=VQVAE,
        compute_maps=vqvae_maps,
        training_module=VQVAEModule.from_run_config,
        primary_map="residual",
        onnx_export=lambda model: True,
    )


def _vqvae2() -> Method:
    from medvq.models.vqvae2.anomaly_map import MAP_NAMES, vqvae2_maps
    from medvq.models.vqvae2.lightning import VQVAE2Module
    from medvq.models.vqvae2.model import VQVAE2

    return Method(
        name="vqvae2",
        summary=SUMMARIES["vqvae2"],
        map_names=MAP_NAMES,
        build_model=VQVAE2,
        compute_maps=vqvae2_maps,
        training_module=VQVAE2Module.from_run_config,
        primary_map="residual",
        stored_model_defaults={"upsampling": "transpose"},
        onnx_export=lambda model: True,
    )


def _classifier() -> Method:
    from medvq.models.classifier.anomaly_map import MAP_NAMES, classifier_maps, map_names_for
    from medvq.models.classifier.lightning import ClassifierModule
    from medvq.models.classifier.model import Classifier
    from medvq.models.classifier.training import resolve_classifier_config, training_targets

    return Method(
        name="classifier",
        summary=SUMMARIES["classifier"],
        map_names=MAP_NAMES,
        build_model=Classifier,
        compute_maps=classifier_maps,
        training_module=ClassifierModule.from_run_config,
        normal_only=False,
        maps_for=map_names_for,
        resolve_config=resolve_classifier_config,
        targets=training_targets,
        primary_map="p_abnormal",
    )


def _patchcore() -> Method:
    from medvq.models.patchcore.anomaly_map import MAP_NAMES, patchcore_maps
    from medvq.models.patchcore.fit import fit_patchcore
    from medvq.models.patchcore.model import PatchCore, prepare_for_export

    return Method(
        name="patchcore",
        summary=SUMMARIES["patchcore"],
        map_names=MAP_NAMES,
        build_model=PatchCore,
        compute_maps=patchcore_maps,
        training_module=None,
        fit=fit_patchcore,
        streams_training=True,
        primary_map="patch_distance",
        onnx_export=prepare_for_export,
    )


def _prior() -> Method:
    from medvq.models.prior.anomaly_map import COMBINATIONS, MAP_NAMES, prior_maps
    from medvq.models.prior.lightning import PriorModule
    from medvq.models.prior.model import LatentPrior
    from medvq.models.prior.training import prepare_prior

    return Method(
        name="prior",
        summary=SUMMARIES["prior"],
        map_names=MAP_NAMES,
        build_model=LatentPrior,
        compute_maps=prior_maps,
        training_module=PriorModule.from_run_config,
        prepare=prepare_prior,
        primary_map="nll",
        combinations=COMBINATIONS,
    )


def _featvq() -> Method:
    from medvq.models.featvq.anomaly_map import COMBINATIONS, MAP_NAMES, featvq_maps
    from medvq.models.featvq.lightning import FeatVQModule
    from medvq.models.featvq.model import FeatVQ

    return Method(
        name="featvq",
        summary=SUMMARIES["featvq"],
        map_names=MAP_NAMES,
        build_model=FeatVQ,
        compute_maps=featvq_maps,
        training_module=FeatVQModule.from_run_config,
        streams_training=True,
        combinations=COMBINATIONS,
        onnx_export=lambda model: False,  # the library quantizer's traced reshape keeps the batch size it saw
    )


_FACTORIES: dict[str, Callable[[], Method]] = {
    "vqvae": _vqvae,
    "vqvae2": _vqvae2,
    "classifier": _classifier,
    "patchcore": _patchcore,
    "prior": _prior,
    "featvq": _featvq,
}

# One line per method for help texts, without importing the method's code.
SUMMARIES: dict[str, str] = {
    "vqvae": "VQ-VAE trained on normal scans; reconstruction residual and alignment loss map (ALM).",
    "classifier": "Supervised ViT / ResNet / EfficientNet-Lite0 classifier (binary or 4-class); Grad-CAM and attention-rollout maps, P(abnormal) score.",
    "vqvae2": "VQ-VAE-2 (top and bottom codes) for MRI and OCT reconstruction; SSIM/PSNR, residual and per-level ALM.",
    "prior": "Latent prior over a trained VQ-VAE's codes (--vqvae RUNDIR): fusion (frozen encoder features -> conv net) or autoregressive transformer; NLL map, sampling.",
    "patchcore": "PatchCore memory bank of ImageNet EfficientNet-Lite0 patch features of normal scans (no gradient training); nearest-neighbour distance map.",
    "featvq": "Feature-space VQ: a codebook of ImageNet EfficientNet-Lite0 patch features of normal scans and a bidirectional prior over its codes; quantisation-distance and NLL maps.",
}


def get_method(name: str) -> Method:
    if name not in _FACTORIES:
        raise KeyError(f"unknown method '{name}' (available: {', '.join(_FACTORIES)})")
    return _FACTORIES[name]()


def method_names() -> list[str]:
    return list(_FACTORIES)
