"""The Sample record: one scan (an image file, a NIfTI slice or a B-scan of an OCT volume) with its label,
patient and split. The readers build and read it; ``medvq.data.samples`` finds them on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str = ""  # class name; "" when unlabelled
    patient_id: str = ""
    split: str | None = None  # split folder it came from, if any
    mask_path: Path | None = None
    frame: int | None = None  # slice of a NIfTI volume (medvq.data.nifti); None for a 2D image file
    eye: str = ""  # OD | OS where known (a manifest, a volume's metadata)
    visit: str = ""  # visit id or scan date where known
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        """File name, with the slice for a volume slice: ``ch2.nii.gz:90``."""
        return self.path.name if self.frame is None else f"{self.path.name}:{self.frame}"
