"""Setting a prior up from its VQ-VAE run: configuration, patient split and frozen weights.

A prior is trained on the data, preprocessing and patient split of its VQ-VAE (``split.json`` of that
run), so no image the VQ-VAE trained or calibrated on reaches the prior's test set, and the prior learns
the code maps of the same normal training images. The frozen weights (VQ-VAE, encoder) are copied into
the prior, whose run directory then loads on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from medvq.data.sample import Sample
from medvq.errors import CheckpointError, DatasetError, MedvqError
from medvq.models.backbones.config import IMAGENET_MEAN, IMAGENET_STD
from medvq.models.backbones.weights import load_lite0_weights
from medvq.models.checkpoint import load_run_weights
from medvq.models.prior.config import LITE0, VIT_RUN, PriorConfig
from medvq.models.prior.model import LatentPrior

# The engine's run directory (``medvq.engine.run_dir.RunDir``): a folder -> an object with ``root``,
# ``config`` and ``weights(which)`` (paths), ``read_config()`` (its RunConfig) and ``read_split()``.
OpenRun = Callable[[Path], Any]


def _run(open_run: OpenRun, path: str | Path, what: str, fix: str) -> tuple[Any, Any]:
    run = open_run(Path(path).expanduser())
    if not run.root.is_dir():
        raise CheckpointError(f"{what} run directory not found", path=run.root, fix=fix)
    if not run.config.is_file():
        raise CheckpointError(f"no config.yaml: not a {what} run directory", path=run.root, fix=fix)
    if not run.weights("best").is_file() and not run.weights("last").is_file():
        raise CheckpointError(f"no model/best.safetensors in the {what} run", path=run.root, fix="has its training finished an epoch?")
    return run, run.read_config()


def prepare_prior(config, data_root: str | Path, open_run: OpenRun) -> tuple[Any, dict[str, list[Sample]]]:
    """The prior's run config (VQ-VAE and encoder architectures, latent grid, the VQ-VAE's data settings) and
    the VQ-VAE's patient split ({'train', 'val', 'test'} -> samples); ``open_run`` opens the VQ-VAE's (and a
    ViT encoder's) run directory."""
    m: PriorConfig = config.model
    if not m.vqvae_run:
        raise MedvqError("a prior needs a trained VQ-VAE", fix="pass --vqvae RUNDIR (a run directory of `medvq train vqvae`)")
    vq_run, vq_config = _run(open_run, m.vqvae_run, "VQ-VAE", "pass --vqvae the folder that `medvq train vqvae --out` wrote")
    if vq_config.method != "vqvae":
        raise CheckpointError(f"is a '{vq_config.method}' run, not a VQ-VAE run", path=vq_run.root, fix="pass --vqvae a `medvq train vqvae` run")
    encoder_config = None
    if m.kind == "fusion" and m.encoder.startswith(VIT_RUN):
        path = m.encoder[len(VIT_RUN) :]
        enc_run, enc_config = _run(open_run, path, "classifier", "pass --encoder vit-run:RUNDIR of `medvq train classifier --arch vit`")
        if enc_config.method != "classifier" or enc_config.model.arch != "vit":
            raise CheckpointError("is not a ViT classifier run", path=enc_run.root, fix="train one with `medvq train classifier --arch vit`, or use --encoder efficientnet-lite0")
        encoder_config = enc_config.model
    data = vq_config.data
    if config.data != data and config.data != type(data)():
        raise MedvqError(
            "a prior takes its data settings (image size, field of view, patient split) from its VQ-VAE run",
            path=vq_run.root,
            fix="leave out the data options; they come from the VQ-VAE's config.yaml",
        )
    stride = vq_config.model.stride
    model = PriorConfig.model_validate(
        {
            **m.model_dump(),
            "vqvae_run": str(vq_run.root.resolve()),
            "vqvae_config": vq_config.model.model_dump(),
            "encoder_config": encoder_config.model_dump() if encoder_config is not None else None,
            "latent_grid": [data.image_size // stride, data.image_size // stride],
        }
    )
    try:
        prepared = type(config).model_validate(
            {"method": config.method, "data": data.model_dump(mode="json"), "model": model.model_dump(mode="json"),
             "train": config.train.model_dump(mode="json"), "score": config.score.model_dump(mode="json")}
        )
    except ValidationError as err:
        raise MedvqError(f"invalid configuration of the prior on {vq_run.root}: {err}") from None
    record = vq_run.read_split()
    root = str(Path(data_root).resolve())
    if record.get("data_root") != root:
        raise DatasetError(
            f"the VQ-VAE run {vq_run.root} was trained on {record.get('data_root')}; a prior trains on the same data and patient split "
            "so that its test patients stay unseen by both models",
            path=data_root,
            fix=f"pass --data {record.get('data_root')}",
        )
    parts = {
        name: [Sample(path=Path(i["path"]), label=i["label"], patient_id=i["patient_id"], frame=i.get("frame")) for i in items]
        for name, items in record.get("splits", {}).items()
    }
    for name in ("train", "val"):
        missing = [s.path for s in parts.get(name, []) if not s.path.is_file()]
        if missing:
            raise DatasetError(f"a {name} image of the VQ-VAE run is missing ({len(missing)} in all)", path=missing[0], fix="restore the data the VQ-VAE was trained on")
    parts.setdefault("test", [])
    return prepared, parts


def load_frozen_weights(model: LatentPrior) -> None:
    """Copy the VQ-VAE run's weights and the encoder's (ImageNet EfficientNet-Lite0, or a ViT run's) into the prior."""
    c = model.config
    load_run_weights(model.vqvae, c.vqvae_run)
    if model.encoder is None:
        return
    if c.encoder == LITE0:
        load_lite0_weights(model.encoder.features, "imagenet", IMAGENET_MEAN, IMAGENET_STD, 1)
    else:
        load_run_weights(model.encoder.vit, c.encoder[len(VIT_RUN) :])
    model.train(model.training)
