"""Manifests and patient-id rules: the patients a split is made of come from the user, never from a guess."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medvq.cli import app
from medvq.data.manifest import read_manifest
from medvq.data.samples import PatientRule, collect_images, dataset_splits, patient_summary, scan_dataset
from medvq.errors import DatasetError

runner = CliRunner()


def _image(path: Path, value: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_lists_scans_with_patient_eye_and_split(tmp_path):
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        _image(tmp_path / "scans" / name)
    _image(tmp_path / "masks" / "b.png", 255)
    manifest = _csv(
        tmp_path / "scans.csv",
        [
            "path,label,patient,eye,visit,split,mask",
            "scans/a.png,NORMAL,P1,right,2024-01-05,train,",
            "scans/b.png,CNV,P2,OS,v1,test,masks/b.png",
            "scans/c.png,NORMAL,P3,L,,validation,",
            f"{tmp_path / 'scans' / 'sub' / 'd.png'},NORMAL,P1,OD,2024-02-01,train,",
        ],
    )
    samples = scan_dataset(manifest)
    by_name = {s.path.name: s for s in samples}
    assert [by_name[n].patient_id for n in ("a.png", "b.png", "c.png", "d.png")] == ["P1", "P2", "P3", "P1"]
    assert [by_name[n].eye for n in ("a.png", "b.png", "c.png", "d.png")] == ["OD", "OS", "OS", "OD"]
    assert by_name["a.png"].visit == "2024-01-05" and by_name["c.png"].split == "val"
    assert by_name["b.png"].mask_path == tmp_path / "masks" / "b.png" and by_name["a.png"].mask_path is None
    parts = dataset_splits(manifest, val_fraction=0.2, test_fraction=0.3, seed=0)
    assert {k: sorted(s.path.name for s in v) for k, v in parts.items()} == {"train": ["a.png", "d.png"], "val": ["c.png"], "test": ["b.png"]}
    assert [s.path.name for s in scan_dataset(manifest, classes=["CNV"])] == ["b.png"]
    assert "train: 2 scans of 1 patients (P1)" in patient_summary(parts)
    assert {s.label for s in collect_images([manifest])} == {"NORMAL", "CNV"}  # inference reads the same list


def test_manifest_without_split_is_split_by_its_patients(tmp_path):
    lines = ["path,label,patient"]
    for p in range(12):
        for k in range(2):
            lines.append(f"{_image(tmp_path / f'img{p}_{k}.png').name},NORMAL,patient{p}")
    parts = dataset_splits(_csv(tmp_path / "m.csv", lines), val_fraction=0.25, test_fraction=0.25, seed=0)
    patients = {k: {s.patient_id for s in v} for k, v in parts.items()}
    assert sum(len(v) for v in patients.values()) == 12 and all(patients.values())
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])


def test_every_manifest_problem_is_reported_at_once_with_its_line(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    _image(tmp_path / "c.png")
    manifest = _csv(
        tmp_path / "bad.csv",
        [
            "path,label,patient,eye,split",
            "a.png,NORMAL,P1,OD,train",  # 2: fine
            "missing.png,NORMAL,P1,OD,train",  # 3: file does not exist
            "b.png,CNV,P2,OD,test",  # 4: fine
            "b.png,NORMAL,P2,OD,test",  # 5: same scan as line 4, another label
            "a.png,NORMAL,P3,OD,testing",  # 6: bad split
            "b.png,CNV,,OD,test",  # 7: empty patient
            "a.png,NORMAL,P9,OD,test",  # 8: same scan as 2, another patient
            "c.png,NORMAL,P4,up,test",  # 9: bad eye
        ],
    )
    with pytest.raises(DatasetError) as info:
        read_manifest(manifest)
    text = str(info.value)
    assert str(manifest) in text
    for expected in (
        "line 3: missing.png does not exist",
        "line 9: eye 'up' is not OD or OS",
        "line 5: the same scan as line 4 with another label (CNV / NORMAL)",
        "line 6: split 'testing' is not train, val or test",
        "line 7: empty patient",
        "line 8: a.png is patient P9 here but P1 on line 2",
    ):
        assert expected in text, (expected, text)
    _csv(tmp_path / "leak.csv", ["path,label,patient,split", "a.png,NORMAL,P1,train", "b.png,CNV,P1,test"])
    with pytest.raises(DatasetError, match="line 3: patient P1 is in split test here but train on line 2"):
        read_manifest(tmp_path / "leak.csv")
    _csv(tmp_path / "cols.csv", ["file,label,site", "a.png,NORMAL,x"])
    with pytest.raises(DatasetError, match=r"line 1: missing column\(s\) path, patient; line 1: unknown column\(s\) file, site"):
        read_manifest(tmp_path / "cols.csv")
    _csv(tmp_path / "frame.csv", ["path,label,patient,frame", "a.png,NORMAL,P1,2"])
    with pytest.raises(DatasetError, match="line 2: frame 2 given for a.png, which is not a volume file"):
        scan_dataset(tmp_path / "frame.csv")


def test_file_names_outside_the_rule_are_reported_not_made_patients(tmp_path):
    root = tmp_path / "data"
    for name in ("P001-OD-012.png", "P001-OS-003.png", "P002-OD-003.png"):
        _image(root / "NORMAL" / name)
    _image(root / "NORMAL" / "NORMAL-77-1.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    assert "3 of 4 files do not fit the OCT2017 name" in str(info.value)
    assert "P001-OD-012.png" in str(info.value) and "--patient-pattern" in str(info.value)
    assert PatientRule().patient(Path("scan-2024-01.jpg"), "NORMAL") is None  # not patient '2024'
    assert PatientRule().patient(Path("CNV-1016042-1__82c423e1.jpeg"), "CNV") == "1016042"
    (root / "NORMAL" / "NORMAL-77-1.png").unlink()
    samples = scan_dataset(root, patient_pattern=r"^NORMAL/(?P<patient>P\d+)-")
    assert sorted(s.patient_id for s in samples) == ["P001", "P001", "P002"]
    # a folder per patient: the pattern sees the path relative to the data folder
    _image(root / "CNV" / "P003" / "x.png")
    nested = tmp_path / "nested"
    _image(nested / "CNV" / "img1.png")
    assert [s.patient_id for s in scan_dataset(nested, patient_pattern=r"(?P<patient>img)\d")] == ["img"]
    with pytest.raises(DatasetError, match="has no group"):
        scan_dataset(root, patient_pattern=r"P\d+")
    with pytest.raises(DatasetError, match="not a regular expression"):
        scan_dataset(root, patient_pattern=r"(P\d+")


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path):
    _image(tmp_path / "a.png")
    manifest = _csv(tmp_path / "scans.csv", ["path,label,patient", "a.png,NORMAL,P1", "gone.png,NORMAL,P2"])
    result = runner.invoke(app, ["train", "vqvae", "--manifest", str(manifest), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "line 3: gone.png does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
