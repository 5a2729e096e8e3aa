"""Finding scans on disk and splitting them by patient.

Layouts understood:
- OCT2017: ``ROOT/{train,val,test}/CLASS/*.jpeg`` (any subset of the split folders);
- flat: ``ROOT/CLASS/*.jpeg``;
- a plain folder or list of files (unlabelled, for inference);
- NIfTI: ``ROOT/{train,validate,test}/*.nii.gz`` (HipMRI slices), ``ROOT/*.nii.gz`` or one file: 2D slice
  files and 3D / 4D volumes taken slice by slice, unlabelled (see ``medvq.data.nifti``).
Lesion masks, where they exist, sit in a parallel tree ``ROOT/masks/[split/]CLASS/<stem>.png``.
The patient id is the second dash-separated field of the OCT2017 name ``CLASS-PATIENT-N.jpeg``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from medvq.data.readers import is_image_file
from medvq.errors import DatasetError
from medvq.io import OUTPUT_MARKER, is_output_folder

if TYPE_CHECKING:
    from medvq.data.nifti import VolumeOptions

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
MASK_DIR = "masks"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str = ""  # class name; "" when unlabelled
    patient_id: str = ""
    split: str | None = None  # split folder it came from, if any
    mask_path: Path | None = None
    frame: int | None = None  # slice of a NIfTI volume (medvq.data.nifti); None for a 2D image file
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        """File name, with the slice for a volume slice: ``ch2.nii.gz:90``."""
        return self.path.name if self.frame is None else f"{self.path.name}:{self.frame}"


def patient_id_from_name(path: Path) -> str:
    """``CNV-1016042-1.jpeg`` -> ``1016042``; names without that pattern are their own patient."""
    parts = path.stem.split("-")
    return parts[1] if len(parts) >= 3 and parts[1] else path.stem


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != MASK_DIR and not is_output_folder(d))


def _outputs_below(folder: Path, exclude: Sequence[Path]) -> set[Path]:
    """Folders under ``folder`` that hold medvq's results (marked, or about to be written): never inputs."""
    marked = {m.parent.resolve() for m in folder.rglob(OUTPUT_MARKER)} - {folder.resolve()}
    return marked | {Path(e).resolve() for e in exclude if Path(e).resolve() != folder.resolve()}


def _mask_for(root: Path, split: str | None, label: str, image: Path) -> Path | None:
    base = root / MASK_DIR / split / label if split else root / MASK_DIR / label
    for suffix in (".png", ".tif", ".tiff"):
        candidate = base / (image.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def scan_dataset(
    root: str | Path, classes: Sequence[str] | None = None, splits: Sequence[str] | None = None, volume: "VolumeOptions | None" = None
) -> list[Sample]:
    """All labelled scans under ``root`` (OCT2017 or flat layout), optionally filtered by class and split;
    or the unlabelled slices of a NIfTI dataset, listed with ``volume`` (default: VolumeOptions())."""
    from medvq.data import nifti

    if nifti.holds_nifti(root):
        return nifti.scan_nifti(root, volume or nifti.VolumeOptions(), splits=splits)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("data folder not found", path=root, fix="pass the folder holding CLASS/ or train|val|test/CLASS/ folders")
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in _class_dirs(root) if d.name.lower() in SPLIT_ALIASES}
    layout = {s: d for s, d in split_dirs.items()} if split_dirs else {None: root}
    samples: list[Sample] = []
    found_classes: set[str] = set()
    for split, folder in layout.items():
        if splits is not None and split is not None and split not in splits:
            continue
        for class_dir in _class_dirs(folder):
            found_classes.add(class_dir.name)
            if classes is not None and class_dir.name not in classes:
                continue
            for image in _images_in(class_dir):
                samples.append(
                    Sample(
                        path=image,
                        label=class_dir.name,
                        patient_id=patient_id_from_name(image),
                        split=split,
                        mask_path=_mask_for(root, split, class_dir.name, image),
                    )
                )
    if not found_classes:
        raise DatasetError(
            "no class folders found",
            path=root,
            fix="expected ROOT/CLASS/*.jpeg or ROOT/{train,val,test}/CLASS/*.jpeg",
        )
    if classes is not None:
        missing = [c for c in classes if c not in found_classes]
        if missing:
            raise DatasetError(
                f"class folder(s) {', '.join(missing)} missing (found: {', '.join(sorted(found_classes))})",
                path=root,
                fix="check the spelling or choose classes that exist",
            )
    if not samples:
        what = f" of class {', '.join(classes)}" if classes else ""
        where = f" in split(s) {', '.join(splits)}" if splits else ""
        raise DatasetError(f"no images{what}{where}", path=root, fix="supported: PNG, JPEG, BMP, TIFF, DICOM")
    return samples


def collect_images(inputs: Iterable[str | Path], volume: "VolumeOptions | None" = None, *, exclude: Sequence[str | Path] = ()) -> list[Sample]:
    """Unlabelled scans from files and folders (recursively), for inference; NIfTI volumes become their
    non-empty slices (listed with ``volume``, default VolumeOptions()). Inside folders, medvq's own result
    folders (and those in ``exclude``, e.g. the output folder of this command) are skipped."""
    from medvq.data import nifti

    usable = lambda p: is_image_file(p) or (p.is_file() and nifti.is_nifti(p))
    samples: list[Sample] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            skipped = _outputs_below(item, exclude)
            files = sorted(
                p for p in item.rglob("*")
                if usable(p) and MASK_DIR not in p.relative_to(item).parts and not skipped.intersection(p.resolve().parents)
            )
            if not files:
                raise DatasetError("no images in folder", path=item, fix="supported: PNG, JPEG, BMP, TIFF, DICOM, NIfTI")
        elif item.exists():
            if not usable(item):
                raise DatasetError("not a supported image file", path=item, fix="supported: PNG, JPEG, BMP, TIFF, DICOM, NIfTI")
            files = [item]
        else:
            raise DatasetError("no such file or folder", path=item)
        for f in files:
            label = f.parent.name if f.parent != item else ""
            if nifti.is_nifti(f):
                samples.extend(nifti.scan_nifti_file(f, volume or nifti.VolumeOptions(), label=label))
            else:
                samples.append(Sample(path=f, label=label, patient_id=patient_id_from_name(f)))
    return samples


def split_by_patient(
    samples: Sequence[Sample], fractions: dict[str, float], seed: int = 0
) -> dict[str, list[Sample]]:
    """Assign whole patients to splits in the given proportions, stratified by the patient's classes.

    Patients are grouped by the set of classes among their scans and each group is shuffled (seeded) and
    cut in proportion, so rare classes reach every split when they can. Deterministic for a given seed.
    """
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total}")
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s)
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for pid, items in by_patient.items():
        strata[tuple(sorted({s.label for s in items}))].append(pid)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    names = list(fractions)
    carry = {name: 0.0 for name in names}  # fractional remainders carried across strata
    for key in sorted(strata):
        pids = sorted(strata[key])
        rng.shuffle(pids)
        start = 0
        for i, name in enumerate(names):
            if i == len(names) - 1:
                count = len(pids) - start
            else:
                exact = fractions[name] * len(pids) + carry[name]
                count = min(int(round(exact)), len(pids) - start)
                carry[name] = exact - count
            for pid in pids[start : start + count]:
                assignment[pid] = name
            start += count
    out: dict[str, list[Sample]] = {name: [] for name in names}
    for s in samples:
        out[assignment[s.patient_id]].append(s)
    return out


def assert_patient_disjoint(splits: dict[str, Sequence[Sample]]) -> None:
    """Raise if any patient appears in more than one split."""
    seen: dict[str, str] = {}
    for name, items in splits.items():
        for s in items:
            other = seen.setdefault(s.patient_id, name)
            if other != name:
                raise DatasetError(f"patient {s.patient_id} is in both the {other} and the {name} split", path=s.path)


def dataset_splits(
    root: str | Path,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    classes: Sequence[str] | None = None,
    volume: "VolumeOptions | None" = None,
) -> dict[str, list[Sample]]:
    """train / val / test samples of a dataset, by patient.

    Split folders are used as they are; missing ones are carved out of the training patients
    (val from train; test from train when there is no test folder). A patient found in two split
    folders is an error.
    """
    samples = scan_dataset(root, classes=classes, volume=volume)
    if all(s.split is None for s in samples):
        parts = split_by_patient(
            samples, {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}, seed
        )
    else:
        parts = {name: [s for s in samples if s.split == name] for name in SPLITS}
        if not parts["test"] and test_fraction > 0:
            carved = split_by_patient(parts["train"], {"train": 1 - test_fraction, "test": test_fraction}, seed)
            parts["train"], parts["test"] = carved["train"], carved["test"]
        if not parts["val"] and val_fraction > 0:
            share = val_fraction / max(1e-9, 1 - test_fraction)
            carved = split_by_patient(parts["train"], {"train": 1 - share, "val": share}, seed + 1)
            parts["train"], parts["val"] = carved["train"], carved["val"]
    assert_patient_disjoint(parts)
    return parts
