"""Typed configuration: one source of truth for every default.

YAML files and CLI flags are views of these models: a run's resolved config is written to
``RUNDIR/config.yaml`` and rebuilds the same pipeline later. Unknown keys are errors, so a typo in a
YAML file never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, model_validator

from medvq.data.config import GRADIENT_ONLY, DataConfig, PhantomConfig, Section  # noqa: F401 (the data layer's settings, below the models)
from medvq.errors import MedvqError
from medvq.models.registry import model_configs


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="Images per optimisation step (per device).")
    epochs: int = Field(30, ge=1, description="Maximum number of epochs.", json_schema_extra=GRADIENT_ONLY)
    min_images_per_epoch: int = Field(
        1000, ge=0, description="Small datasets are cycled (reshuffled each pass) so that an epoch sees at least this many images.", json_schema_extra=GRADIENT_ONLY
    )
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate (after a 100-step linear warm-up).", json_schema_extra={"aliases": ["lr"], **GRADIENT_ONLY})
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.", json_schema_extra=GRADIENT_ONLY)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After the warm-up: constant (a resumed run given more epochs continues exactly), "
        "or cosine decay to 1% of learning_rate at the last epoch (quieter final weights).",
        json_schema_extra=GRADIENT_ONLY,
    )
    patience: int = Field(10, ge=1, description="Early stopping: epochs without improvement of the validation loss.", json_schema_extra=GRADIENT_ONLY)
    min_delta: float = Field(1e-4, ge=0, description="Early stopping: smallest change that counts as improvement.", json_schema_extra=GRADIENT_ONLY)
    device: str = Field("auto", description="Accelerator: auto, cpu, gpu, mps.", json_schema_extra={"aliases": ["accelerator"]})
    devices: str = Field("auto", description="Devices per node: a count, a list like '0,1', or auto.")
    num_nodes: int = Field(1, ge=1, description="Nodes for multi-node DDP.", json_schema_extra=GRADIENT_ONLY)
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...", json_schema_extra=GRADIENT_ONLY)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto",
        description="Numeric precision. auto = bf16-mixed where the CPU or GPU computes bf16 natively (about 2x faster), else 32. "
        "VQ distances stay fp32.",
        json_schema_extra=GRADIENT_ONLY,
    )
    channels_last: bool = Field(True, description="channels_last memory format for convolutions.")
    compile: bool = Field(False, description="torch.compile the model (slow first step, faster after).", json_schema_extra=GRADIENT_ONLY)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.", json_schema_extra=GRADIENT_ONLY)
    seed: int = Field(0, description="Random seed of initialisation, batching and augmentation.")
    samples_per_epoch: int = Field(8, ge=0, description="Reconstructions saved per epoch as an image grid.", json_schema_extra=GRADIENT_ONLY)


class ScoreConfig(Section):
    maps: list[str] | None = Field(None, description="Anomaly maps to compute (comma-separated on the CLI; default: all maps of the method).")
    combine: list[str] | None = Field(None, description="Maps averaged after standardisation into 'combined' (default: all computed maps).")
    reducer: Literal["topk", "mean", "max"] = Field("topk", description="How a map becomes an image score.")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="Share of the highest pixels averaged by the topk reducer.")
    volume_topk_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Volumes: share of a volume's B-scans, the highest-scoring, whose scores are averaged into the volume score "
        "(at least one B-scan): several abnormal B-scans lift a volume, one noisy B-scan of a large volume does not decide it.",
    )
    smoothing_sigma: float = Field(2.0, ge=0, description="Gaussian smoothing of every map, in units of image_size/128 pixels.")
    operating_point: Literal["spec95", "spec99"] = Field(
        "spec95",
        description="Threshold that calls a scan abnormal: the score at 95 % or 99 % specificity on the held-out calibration normals "
        "(stored in calibration.json; `medvq infer --threshold` overrides it).",
    )


class InferenceConfig(Section):
    """How scans are scored (evaluate, infer, Detector.predict_files): speed settings, not part of a run."""

    batch_size: int = Field(32, ge=1, description="Scans per model call.")
    workers: int = Field(2, ge=0, description="Worker processes that read and preprocess scans while the model runs (0: read in the scoring process).")
    precision: Literal["32", "bf16"] = Field(
        "32", description="Model arithmetic: 32, or bf16 autocast (faster where the CPU computes bf16 natively; VQ distances stay fp32)."
    )


class BenchmarkConfig(Section):
    """Defaults of `medvq benchmark` that are not run settings."""

    methods: list[str] = Field(["vqvae", "patchcore"], description="Methods compared (comma-separated on the CLI), or 'all' (every registered method).")


class RunConfig(Section):
    """A run: the method (``medvq.models.<method>/``, whose declared config class validates ``model``) and its settings."""

    method: str = Field("vqvae", description="The method trained (a folder of medvq.models that declares itself in method.py).")
    data: DataConfig = DataConfig()
    model: SerializeAsAny[BaseModel] = Field(None, description="The method's architecture config (default: its defaults).", validate_default=True)
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()

    @model_validator(mode="before")
    @classmethod
    def _model_for_method(cls, values: Any) -> Any:
        if isinstance(values, dict):
            method = values.get("method", DEFAULT_METHOD)
            configs = model_configs()
            if method not in configs:
                raise ValueError(f"unknown method '{method}' (available: {', '.join(configs)})")
            model = values.get("model") or {}
            if not isinstance(model, configs[method]):
                try:
                    model = configs[method].model_validate(model.model_dump() if isinstance(model, BaseModel) else model)
                except ValidationError as err:
                    raise ValueError("; ".join(f"model.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
            values = {**values, "model": model}
        return values

    @model_validator(mode="after")
    def _stride(self) -> "RunConfig":
        stride = getattr(self.model, "stride", 1)
        if self.data.image_size % stride:
            raise ValueError(
                f"image_size {self.data.image_size} is not a multiple of the model stride {stride}; "
                f"use e.g. {max(stride, round(self.data.image_size / stride) * stride)}"
            )
        return self


DEFAULT_METHOD: str = RunConfig.model_fields["method"].default


def sections(method: str = DEFAULT_METHOD) -> dict[str, type[BaseModel]]:
    """The config sections of a method, in CLI order."""
    return {"data": DataConfig, "model": model_configs()[method], "train": TrainConfig, "score": ScoreConfig}


def format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return f"invalid configuration from {source}: " + "; ".join(parts)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedvqError("config file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MedvqError(f"not valid YAML: {err}", path=path) from err
    if not isinstance(data, dict):
        raise MedvqError("a config file must hold a mapping of sections (data, model, train, score)", path=path)
    return data


def build_config(*layers: dict[str, Any], source: str = "arguments") -> RunConfig:
    """Merge nested dicts (later wins) over the defaults and validate."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise MedvqError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    return build_config(load_yaml(path), overrides or {}, source=str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
