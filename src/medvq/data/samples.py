"""Finding scans on disk and splitting them by patient.

Layouts understood:
- OCT2017: ``ROOT/{train,val,test}/CLASS/*.jpeg`` (any subset of the split folders);
- flat: ``ROOT/CLASS/*.jpeg``;
- a plain folder or list of files (unlabelled, for inference);
- NIfTI: ``ROOT/{train,validate,test}/*.nii.gz`` (HipMRI slices), ``ROOT/*.nii.gz`` or one file: 2D slice
  files and 3D / 4D volumes taken slice by slice, unlabelled (see ``medvq.data.nifti``).
- a manifest CSV listing the scans with label and patient (``medvq.data.manifest``).
Lesion masks, where they exist, sit in a parallel tree ``ROOT/masks/[split/]CLASS/<stem>.png``.

Patient ids of image folders come from the file names (``PatientRule``): by default the OCT2017 name
``CLASS-PATIENT-N.jpeg`` whose first field is the class folder; ``data.patient_pattern`` (a regular
expression with a ``(?P<patient>...)`` group, searched in the path relative to the data folder) replaces
that rule. Files that the rule does not fit are never made patients of their own (a patient split on
them would leak): listing a labelled dataset stops and says how many and which, so the user can give a
pattern or a manifest.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from medvq.data import manifest, nifti, volumes
from medvq.data.manifest import read_manifest
from medvq.data.nifti import VolumeOptions
from medvq.data.readers import is_image_file
from medvq.data.sample import SPLIT_ALIASES, SPLITS, Sample
from medvq.data.volumes import VOLUME_SUFFIXES
from medvq.errors import DatasetError
from medvq.io import OUTPUT_MARKER, is_output_folder

MASK_DIR = "masks"


OCT2017_NAME = re.compile(r"^(?P<cls>[^-]+)-(?P<patient>[^-]+)-\d+(__.*)?$")  # kermany-dev copies carry a __hash suffix


@dataclass(frozen=True)
class PatientRule:
    """Patient id from a file's path: ``pattern`` (searched in the path relative to the data folder, its
    ``patient`` group or else its first group), or by default the OCT2017 name ``CLASS-PATIENT-N`` whose
    first field is the scan's class folder. ``None`` where the rule does not fit."""

    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.pattern is not None:
            try:
                regex = re.compile(self.pattern)
            except re.error as err:
                raise DatasetError(f"--patient-pattern {self.pattern!r} is not a regular expression: {err}") from None
            if regex.groups == 0:
                raise DatasetError(f"--patient-pattern {self.pattern!r} has no group", fix="mark the patient id with (?P<patient>...), e.g. '(?P<patient>P\\d+)-O[DS]-'")

    def describe(self) -> str:
        return f"--patient-pattern {self.pattern!r}" if self.pattern else "the OCT2017 name CLASS-PATIENT-N (first field = class folder)"

    def patient(self, path: Path, label: str = "", root: Path | None = None) -> str | None:
        if self.pattern is not None:
            text = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
            match = re.search(self.pattern, text)
            if not match:
                return None
            found = match.group("patient") if "patient" in match.re.groupindex else match.group(1)
            return found or None
        match = OCT2017_NAME.match(path.stem)
        if match and (not label or match.group("cls").lower() == label.lower()):
            return match.group("patient")
        return None


def patient_id_from_name(path: Path, label: str = "") -> str:
    """``CNV-1016042-1.jpeg`` -> ``1016042``; ``""`` for names without that pattern (the patient is unknown)."""
    return PatientRule().patient(path, label) or ""


def _check_patients(samples: list[Sample], unknown: list[Path], rule: PatientRule, root: Path) -> None:
    if unknown:
        examples = ", ".join(p.name for p in unknown[:3])
        raise DatasetError(
            f"{len(unknown)} of {len(samples) + len(unknown)} files do not fit {rule.describe()}, so their patient is unknown (e.g. {examples})",
            path=root,
            fix="give --patient-pattern REGEX with a (?P<patient>...) group, or list the scans with their patients in a --manifest CSV",
        )


def _images_in(folder: Path) -> list[Path]:
    """Image files and OCT volume files (``medvq.data.volumes``) of a folder."""
    return sorted(p for p in folder.iterdir() if is_image_file(p) or (p.suffix.lower() in VOLUME_SUFFIXES and p.is_file() and not p.name.startswith(".")))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != MASK_DIR and not is_output_folder(d))


def _outputs_below(folder: Path, exclude: Sequence[Path]) -> set[Path]:
    """Folders under ``folder`` that hold medvq's results (marked, or about to be written): never inputs."""
    marked = {m.parent.resolve() for m in folder.rglob(OUTPUT_MARKER)} - {folder.resolve()}
    return marked | {Path(e).resolve() for e in exclude if Path(e).resolve() != folder.resolve()}


def refuse_medvq_folder(path: Path, role: str, run_fix: str) -> None:
    """Refuse ``path`` (a folder, or a file in it) when medvq wrote it: a run folder, or a folder of results
    (maps, overlays, en-face maps) marked by ``mark_output``. ``role`` says what the command wanted there,
    ``run_fix`` how to call it when a run folder was given."""
    folder = path if path.is_dir() else path.parent
    if not is_output_folder(folder):
        return
    if (folder / "config.yaml").is_file():
        raise DatasetError(f"{'is' if folder == path else 'lies in'} a medvq run folder, not {role}", path=path, fix=run_fix)
    raise DatasetError(
        f"{'is' if folder == path else 'lies in'} a folder of medvq results (it holds {OUTPUT_MARKER}): its images are medvq's own outputs (maps, overlays, figures), not {role}",
        path=path,
        fix=f"pass the scans themselves; if this folder does hold your scans, delete its {OUTPUT_MARKER} file",
    )


def _mask_for(root: Path, split: str | None, label: str, image: Path) -> Path | None:
    base = root / MASK_DIR / split / label if split else root / MASK_DIR / label
    for suffix in (".png", ".tif", ".tiff"):
        candidate = base / (image.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def scan_dataset(
    root: str | Path,
    classes: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    volume: "VolumeOptions | None" = None,
    patient_pattern: str | None = None,
) -> list[Sample]:
    """All labelled scans under ``root`` (OCT2017 or flat layout) or listed by a manifest CSV, optionally
    filtered by class and split; or the unlabelled slices of a NIfTI dataset, listed with ``volume``
    (default: VolumeOptions()). ``patient_pattern`` replaces the file-name rule of patient ids."""
    rule = PatientRule(patient_pattern)
    if manifest.is_manifest(root):
        return _filtered(manifest_samples(root, volume), classes, splits, Path(root))
    if nifti.holds_nifti(root):
        samples = nifti.scan_nifti(root, volume or nifti.VolumeOptions(), splits=splits)
        return _with_pattern(samples, rule, Path(root)) if patient_pattern else samples
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("data folder not found", path=root, fix="pass the folder holding CLASS/ or train|val|test/CLASS/ folders, or a manifest .csv")
    if is_output_folder(root) and (root / "config.yaml").is_file():
        refuse_medvq_folder(root, "a dataset", "pass --data the folder of scans (CLASS/ or train|val|test/CLASS/ folders) or a manifest .csv")
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in _class_dirs(root) if d.name.lower() in SPLIT_ALIASES}
    layout = {s: d for s, d in split_dirs.items()} if split_dirs else {None: root}
    samples: list[Sample] = []
    unknown: list[Path] = []
    found_classes: set[str] = set()
    for split, folder in layout.items():
        if splits is not None and split is not None and split not in splits:
            continue
        for class_dir in _class_dirs(folder):
            found_classes.add(class_dir.name)
            if classes is not None and class_dir.name not in classes:
                continue
            for image in _images_in(class_dir):
                if is_volume_file(image):  # its B-scans; the patient from the pattern if given, else the file's metadata
                    scans = volume_samples(image, volume, label=class_dir.name, split=split)
                    patient = rule.patient(image, class_dir.name, root) if patient_pattern else (scans[0].patient_id or None)
                    if patient is None:
                        unknown.append(image)
                    else:
                        samples.extend(replace(s, patient_id=patient) for s in scans)
                    continue
                patient = rule.patient(image, class_dir.name, root)
                if patient is None:
                    unknown.append(image)
                    continue
                samples.append(
                    Sample(
                        path=image,
                        label=class_dir.name,
                        patient_id=patient,
                        split=split,
                        mask_path=_mask_for(root, split, class_dir.name, image),
                    )
                )
    if not found_classes:
        raise DatasetError(
            "no class folders found",
            path=root,
            fix="expected ROOT/CLASS/*.jpeg or ROOT/{train,val,test}/CLASS/*.jpeg, or a manifest .csv",
        )
    if classes is not None:
        missing = [c for c in classes if c not in found_classes]
        if missing:
            raise DatasetError(
                f"class folder(s) {', '.join(missing)} missing (found: {', '.join(sorted(found_classes))})",
                path=root,
                fix="check the spelling or choose classes that exist",
            )
    _check_patients(samples, unknown, rule, root)
    if not samples:
        what = f" of class {', '.join(classes)}" if classes else ""
        where = f" in split(s) {', '.join(splits)}" if splits else ""
        raise DatasetError(f"no images{what}{where}", path=root, fix="supported: PNG, JPEG, BMP, TIFF, DICOM")
    return samples


def _with_pattern(samples: list[Sample], rule: PatientRule, root: Path) -> list[Sample]:
    out, unknown = [], []
    for s in samples:
        patient = rule.patient(s.path, s.label, root if root.is_dir() else None)
        if patient is None:
            unknown.append(s.path)
        else:
            out.append(replace(s, patient_id=patient))
    _check_patients(out, sorted(set(unknown)), rule, root)
    return out


def _filtered(samples: list[Sample], classes: Sequence[str] | None, splits: Sequence[str] | None, source: Path) -> list[Sample]:
    if classes is not None:
        found = {s.label for s in samples}
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"class(es) {', '.join(missing)} not in the manifest (found: {', '.join(sorted(found))})", path=source, fix="check the spelling or choose classes that exist")
        samples = [s for s in samples if s.label in classes]
    if splits is not None:
        samples = [s for s in samples if s.split is None or s.split in splits]
    if not samples:
        raise DatasetError(f"no scans in split(s) {', '.join(splits or [])}", path=source)
    return samples


def manifest_samples(path: str | Path, volume: "VolumeOptions | None" = None) -> list[Sample]:
    """The samples of a manifest: one per image row, one per B-scan / slice of a volume row without a frame."""
    samples: list[Sample] = []
    for row in read_manifest(path):
        if row.frame is not None and not is_volume_file(row.path):
            raise DatasetError(f"line {row.line}: frame {row.frame} given for {row.path.name}, which is not a volume file", path=path, fix="leave the frame empty for 2D images")
        base = Sample(
            path=row.path, label=row.label, patient_id=row.patient, split=row.split, mask_path=row.mask, frame=row.frame, eye=row.eye, visit=row.visit
        )
        if row.frame is None and is_volume_file(row.path):
            samples.extend(replace(s, label=row.label, patient_id=row.patient, split=row.split, eye=row.eye or s.eye, visit=row.visit or s.visit) for s in volume_samples(row.path, volume))
        else:
            samples.append(base)
    return samples


def is_volume_file(path: Path) -> bool:
    """A file that holds a stack of 2D scans: an OCT volume (``medvq.data.volumes``) or NIfTI."""
    return nifti.is_nifti(path) or volumes.is_oct_volume(path)


def volume_samples(path: Path, volume: "VolumeOptions | None" = None, *, label: str = "", split: str | None = None) -> list[Sample]:
    """One sample per usable 2D scan of a volume file, with what its metadata says of patient and eye."""
    if volumes.is_oct_volume(path):
        return volumes.scan_volume_file(path, label=label, split=split)
    return nifti.scan_nifti_file(path, volume or nifti.VolumeOptions(), label=label, split=split)


def collect_images(inputs: Iterable[str | Path], volume: "VolumeOptions | None" = None, *, exclude: Sequence[str | Path] = ()) -> list[Sample]:
    """Unlabelled scans from files and folders (recursively), for inference; NIfTI volumes become their
    non-empty slices (listed with ``volume``, default VolumeOptions()); a manifest CSV its scans. Patient ids
    come from the OCT2017 name where it fits and are left empty otherwise. Inside folders, medvq's own result
    folders (and those in ``exclude``, e.g. the output folder of this command) are skipped; a run folder or
    a folder of results given as an input (or a file in one) is refused (``refuse_medvq_folder``)."""
    usable = lambda p: is_image_file(p) or (p.is_file() and is_volume_file(p))
    samples: list[Sample] = []
    for item in inputs:
        item = Path(item)
        if manifest.is_manifest(item):
            samples.extend(manifest_samples(item, volume))
            continue
        if item.exists():
            refuse_medvq_folder(item, "scans", "pass the scans; a run folder goes where a command asks for its RUN")
        if item.is_dir():
            skipped = _outputs_below(item, exclude)
            files = sorted(
                p for p in item.rglob("*")
                if usable(p) and MASK_DIR not in p.relative_to(item).parts and not skipped.intersection(p.resolve().parents)
            )
            if not files:
                inside = {f for f in skipped if f.is_relative_to(item.resolve())}
                results = sorted(str(f.relative_to(item.resolve())) for f in inside if not inside.intersection(f.parents))  # the outermost ones
                beside = f"; the medvq result folders in it ({', '.join(results[:3])}{', ...' if len(results) > 3 else ''}) are never read as scans" if results else ""
                raise DatasetError(f"no images in folder{beside}", path=item, fix="supported: PNG, JPEG, BMP, TIFF, DICOM, NIfTI")
        elif item.exists():
            if not usable(item):
                raise DatasetError("not a supported image file", path=item, fix="supported: PNG, JPEG, BMP, TIFF, DICOM, NIfTI, or a manifest .csv")
            files = [item]
        else:
            raise DatasetError("no such file or folder", path=item)
        for f in files:
            label = f.parent.name if f.parent != item else ""
            if is_volume_file(f):
                samples.extend(volume_samples(f, volume, label=label))
            else:
                samples.append(Sample(path=f, label=label, patient_id=patient_id_from_name(f, label)))
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


def patient_summary(parts: dict[str, Sequence[Sample]], shown: int = 5) -> str:
    """One line per split: how many scans and patients, and the first patient ids (all are in split.json)."""
    lines = []
    for name, items in parts.items():
        patients = sorted({s.patient_id for s in items})
        more = f", ... ({len(patients) - shown} more)" if len(patients) > shown else ""
        lines.append(f"  {name}: {len(items)} scans of {len(patients)} patients ({', '.join(patients[:shown])}{more})")
    return "\n".join(lines)


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
    patient_pattern: str | None = None,
) -> dict[str, list[Sample]]:
    """train / val / test samples of a dataset, by patient.

    Split folders are used as they are; missing ones are carved out of the training patients
    (val from train; test from train when there is no test folder). A patient found in two split
    folders is an error.
    """
    samples = scan_dataset(root, classes=classes, volume=volume, patient_pattern=patient_pattern)
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
