"""Settings of the data layer: how scans are read, split and prepared (DataConfig) and how phantom scans are
drawn (PhantomConfig). Pydantic models without torch; ``medvq.config`` gathers them with the rest of a run's
settings, and the data modules take their defaults from here (the one source)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# Settings that only gradient training reads (augmentation, epochs, optimiser, early stopping, Lightning): methods
# fitted in one pass (Method.training == "fit") ignore them, and their `medvq train` shows no flag for them.
GRADIENT_ONLY = {"gradient_only": True}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    image_size: int = Field(128, ge=16, description="Side of the square model input in pixels (a multiple of the model's stride).")
    fov: Literal["stretch", "crop"] = Field(
        "stretch",
        description="Field of view: 'stretch' resizes the whole scan to a square (same anatomy for any A-scan count); "
        "'crop' keeps the pixel spacing and takes the central square.",
    )
    remove_padding: bool = Field(True, description="Fill white registration padding and leave it out of every score.")
    train_classes: list[str] = Field(["NORMAL"], description="Classes used for training (comma-separated on the CLI).")
    normal_class: str = Field("NORMAL", description="The class that counts as normal in evaluation.")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of patients held out for validation and calibration when the data has no val split.")
    test_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="Share of patients held out for testing when the data has no test split.")
    split_seed: int = Field(0, description="Seed of the patient split.")
    patient_pattern: str | None = Field(
        None,
        description="Regular expression whose (?P<patient>...) group (or first group) is the patient id, searched in each file's path "
        "relative to the data folder, e.g. '(?P<patient>P\\d+)-O[DS]-' for CLASS/P001-OD-012.png (default: the OCT2017 name CLASS-PATIENT-N).",
    )
    hflip: bool = Field(True, description="Random left-right flips while training (left and right eyes mirror each other).", json_schema_extra=GRADIENT_ONLY)
    zoom: float = Field(
        0.0, ge=0.0, lt=1.0, description="Random rescaling while training by a factor in [1 - zoom, 1 + zoom] (0: off); helps when test anatomy is smaller or larger.",
        json_schema_extra=GRADIENT_ONLY,
    )
    shift: float = Field(
        0.0, ge=0.0, le=0.5, description="Random translation while training by up to this share of the image side (0: off).", json_schema_extra=GRADIENT_ONLY
    )
    max_train_images: int | None = Field(None, ge=1, description="Use at most this many training images (seeded choice).")
    slice_axis: Literal["axial", "coronal", "sagittal"] = Field(
        "axial", description="NIfTI volumes: anatomical axis the 2D slices are cut along (after reorienting to RAS+; 2D slice files are read as stored)."
    )
    series_volumes: Literal["all", "first", "mean"] = Field(
        "all", description="NIfTI 4D series (X, Y, Z, T): slice every volume, only the first, or their voxel-wise mean."
    )
    intensity_scope: Literal["volume", "slice"] = Field(
        "volume",
        description="NIfTI intensity normalisation: clip levels from the foreground of the whole 3D volume (slices keep their relative "
        "brightness) or of each slice. A 2D slice file is its own volume.",
    )
    intensity_low_percentile: float = Field(0.5, ge=0, lt=50, description="NIfTI: foreground intensities at or below this percentile map to 0.")
    intensity_high_percentile: float = Field(99.5, gt=50, le=100, description="NIfTI: foreground intensities at or above this percentile map to 1.")
    min_foreground_fraction: float = Field(
        0.05, ge=0, lt=1, description="NIfTI volumes: skip slices whose share of foreground voxels (finite, above the volume minimum) is below this."
    )

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


def from_data_config(cls: type, data: DataConfig, **others: Any) -> Any:
    """The dataclass ``cls`` with every field it shares by name with ``DataConfig`` taken from ``data``, the
    rest from ``others`` (options such as ``VolumeOptions`` follow the data settings field by field)."""
    shared = {f.name: getattr(data, f.name) for f in dataclasses.fields(cls) if f.name in DataConfig.model_fields}
    return cls(**shared, **others)


class PhantomConfig(BaseModel):
    """How phantom scans are drawn (``medvq phantom``, ``medvq.data.phantom``).

    Speckle and noise are given at the native 496x512 scale; smaller images get less, as a downsampled
    scan would."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(496, ge=32, description="Scan height in pixels.")
    width: int = Field(512, ge=32, description="Scan width in pixels.")
    speckle: float = Field(0.08, ge=0, allow_inf_nan=False, description="Standard deviation of the multiplicative speckle.")
    noise_floor: float = Field(
        14.0, ge=0, allow_inf_nan=False, description="Standard deviation (grey levels) of the additive noise that dominates dark regions such as the vitreous."
    )
    padding_probability: float = Field(0.3, ge=0, le=1, description="Share of scans with white registration padding.")
    lesion_size: tuple[float, float] = Field((0.6, 1.6), description="LOW,HIGH range of the log-uniform size multiplier drawn per lesion.")
    mask_min_shift: float = Field(0.5, gt=0, description="Tissue a lesion moves by less than this many pixels is left as it was and stays out of the mask.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the written scans.")

    @field_validator("lesion_size")
    @classmethod
    def _lesion_size(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"lesion_size must be LOW,HIGH with 0 < LOW <= HIGH, got {value[0]:g},{value[1]:g}")
        return value
