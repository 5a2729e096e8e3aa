from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvq.data.samples import (
    Sample,
    assert_patient_disjoint,
    collect_images,
    dataset_splits,
    patient_id_from_name,
    scan_dataset,
    split_by_patient,
)
from medvq.errors import DatasetError


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 80, np.uint8)).save(path)


def _flat(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    for cls, patients in spec.items():
        for pid, n in patients.items():
            for k in range(n):
                _write(root / cls / f"{cls}-{pid}-{k + 1}.jpeg")
    return root


def test_patient_id():
    assert patient_id_from_name(Path("CNV-1016042-1.jpeg")) == "1016042"
    assert patient_id_from_name(Path("CNV-1016042-1__82c423e1.jpeg")) == "1016042"
    assert patient_id_from_name(Path("scan.png")) == ""  # unknown, never the file stem


def test_flat_and_split_layouts(tmp_path):
    flat = _flat(tmp_path / "flat", {"NORMAL": {"1": 2, "2": 1}, "CNV": {"3": 2}})
    samples = scan_dataset(flat)
    assert len(samples) == 5 and {s.split for s in samples} == {None}
    assert {s.label for s in samples} == {"NORMAL", "CNV"}
    oct_root = tmp_path / "oct"
    _write(oct_root / "train" / "NORMAL" / "NORMAL-1-1.jpeg")
    _write(oct_root / "test" / "CNV" / "CNV-2-1.jpeg")
    _write(oct_root / "masks" / "test" / "CNV" / "CNV-2-1.png")
    samples = scan_dataset(oct_root)
    assert {(s.split, s.label) for s in samples} == {("train", "NORMAL"), ("test", "CNV")}
    cnv = next(s for s in samples if s.label == "CNV")
    assert cnv.mask_path is not None and cnv.mask_path.name == "CNV-2-1.png"


def test_missing_class_and_empty_folders(tmp_path):
    flat = _flat(tmp_path / "d", {"NORMAL": {"1": 1}})
    with pytest.raises(DatasetError, match="DME.*missing.*found: NORMAL"):
        scan_dataset(flat, classes=["DME"])
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images") as info:
        scan_dataset(tmp_path / "empty")
    assert "empty" in str(info.value)
    with pytest.raises(DatasetError, match="no class folders"):
        scan_dataset(tmp_path / "empty" / "NORMAL")
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no images in folder"):
        collect_images([tmp_path / "empty"])


def test_patient_split_is_disjoint_stratified_and_deterministic(tmp_path):
    spec = {"NORMAL": {str(i): 3 for i in range(40)}, "DME": {str(100 + i): 2 for i in range(10)}}
    samples = scan_dataset(_flat(tmp_path / "d", spec))
    a = split_by_patient(samples, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=5)
    b = split_by_patient(samples, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=5)
    assert a == b
    assert_patient_disjoint(a)
    for part in a.values():
        assert any(s.label == "DME" for s in part), "a rare class reaches every split"
    assert sum(len(v) for v in a.values()) == len(samples)
    assert abs(len({s.patient_id for s in a["train"]}) - 30) <= 1


def test_overlap_detector_fails_on_shared_patient():
    s1 = Sample(Path("NORMAL-7-1.jpeg"), "NORMAL", "7")
    s2 = Sample(Path("NORMAL-7-2.jpeg"), "NORMAL", "7")
    with pytest.raises(DatasetError, match="patient 7 is in both"):
        assert_patient_disjoint({"train": [s1], "test": [s2]})


def test_dataset_splits_on_real_kermany_are_patient_disjoint(kermany):
    parts = dataset_splits(kermany, val_fraction=0.15, test_fraction=0.3, seed=0)
    assert_patient_disjoint(parts)
    labels = {name: {s.label for s in items} for name, items in parts.items()}
    assert labels["test"] == {"NORMAL", "CNV", "DME", "DRUSEN"}
    assert sum(len(v) for v in parts.values()) == len(scan_dataset(kermany))
