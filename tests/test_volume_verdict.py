"""A verdict per volume: top-k aggregation, en-face maps, and volumes through train / evaluate / infer."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from volume_files import write_dicom_opt

from medvq.cli import app
from medvq.config import ScoreConfig
from medvq.data.samples import Sample, scan_dataset
from medvq.scoring.volume import en_face, group_volumes, topk_count, verdict, volume_level_scores, volume_score

runner = CliRunner()


def _bscans(path: str, n: int, label: str = "NORMAL", patient: str = "P1") -> list[Sample]:
    return [Sample(path=Path(path), label=label, patient_id=patient, frame=i, eye="OD") for i in range(n)]


def test_volume_score_is_the_mean_of_the_highest_tenth_of_bscan_scores():
    assert [topk_count(n, 0.1) for n in (1, 10, 11, 128)] == [1, 1, 2, 13]
    assert ScoreConfig().volume_topk_fraction == 0.1
    scores = np.zeros(20)
    scores[[4, 5]] = [3.0, 5.0]
    assert volume_score(scores, 0.1) == pytest.approx(4.0)  # the two highest of 20
    assert volume_score([7.0], 0.1) == 7.0 and volume_score(scores, 1.0) == pytest.approx(0.4)
    v = verdict("vol", _bscans("v.dcm", 20, "CNV"), scores, normal_scores=np.linspace(-2, 2, 101), threshold=3.5, fraction=0.1)
    assert v.most_abnormal == [5, 4] and v.decision == "abnormal" and v.label == "CNV"
    assert v.normal_percentile == 100.0 and v.z == pytest.approx(4.0 / np.linspace(-2, 2, 101).std(), rel=1e-6)
    assert verdict("vol", _bscans("v.dcm", 20), scores - 2, normal_scores=[0.0, 1.0], threshold=3.5, fraction=0.1).decision == "normal"
    assert verdict("vol", _bscans("v.dcm", 20), scores, normal_scores=[0.0, 1.0], fraction=0.1).decision == ""  # no stored threshold: no call


def test_en_face_map_lights_up_where_a_lesion_was_planted():
    maps = [np.zeros((30, 40), np.float32) for _ in range(6)]
    for b in (2, 3):
        maps[b][18:22, 10:15] = 4.0  # a lesion at depth 18-21, columns 10-14, on B-scans 2 and 3
    enface = en_face([m.max(axis=0) for m in maps])
    assert enface.shape == (6, 40)
    hot = np.argwhere(enface > 1)
    assert set(hot[:, 0]) == {2, 3} and set(hot[:, 1]) == set(range(10, 15))
    resampled = en_face([np.arange(40.0), np.arange(40.0), np.linspace(0, 39, 20)])  # a narrower scan is resampled
    np.testing.assert_allclose(resampled[2], np.arange(40.0), atol=1e-4)


def test_volumes_are_grouped_by_file_or_by_eye_and_visit():
    samples = [
        *_bscans("a.dcm", 3, "NORMAL", "P1"),
        Sample(path=Path("x.png"), label="CNV", patient_id="P2", eye="OS", visit="2024-01"),
        Sample(path=Path("y.png"), label="NORMAL", patient_id="P2", eye="OS", visit="2024-01"),
        Sample(path=Path("z.png"), label="NORMAL", patient_id="P3"),  # no eye or visit: a scan on its own
        *_bscans("b.dcm", 2, "NORMAL", "P4"),
    ]
    groups = group_volumes(samples)
    assert list(groups.values()) == [[0, 1, 2], [3, 4], [6, 7]]
    labels, scores = volume_level_scores(samples, {"s": np.arange(8.0)}, "NORMAL", 0.1)
    assert labels == ["NORMAL", "CNV", "NORMAL"]  # a volume with an abnormal B-scan is abnormal
    np.testing.assert_allclose(scores["s"], [2.0, 4.0, 7.0])


def test_volume_auroc_interval_resamples_patients_not_volumes():
    from medvq.evaluation.evaluate import BOOTSTRAP_RESAMPLES, volume_metrics
    from medvq.evaluation.metrics import bootstrap_auroc_interval

    rng = np.random.default_rng(0)
    samples, scores = [], []
    for p in range(8):  # four normal and four CNV patients, two volumes (eyes) each that score alike
        label, level = ("CNV", rng.normal(1.0)) if p >= 4 else ("NORMAL", rng.normal(0.0))
        for eye in ("od", "os"):
            samples += _bscans(f"p{p}_{eye}.dcm", 3, label, f"P{p}")
            scores += list(level + 0.01 * rng.normal(size=3))
    found = volume_metrics(samples, {"s": np.array(scores)}, "NORMAL", 0.1)
    assert found["n_volumes"] == 16 and found["n_patients"] == 8
    labels, volume_scores = volume_level_scores(samples, {"s": np.array(scores)}, "NORMAL", 0.1)
    y, patients = np.array([lab != "NORMAL" for lab in labels], int), np.repeat([f"P{p}" for p in range(8)], 2)
    m = found["maps"]["s"]
    assert m["auroc_ci"] == list(bootstrap_auroc_interval(y, volume_scores["s"], patients, BOOTSTRAP_RESAMPLES))
    assert m["auroc_ci"] != list(bootstrap_auroc_interval(y, volume_scores["s"], np.arange(16), BOOTSTRAP_RESAMPLES))
    assert m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1] and set(m["auroc_per_class_ci"]) == {"CNV"}
    separated = volume_metrics(samples, {"s": np.repeat(np.arange(16) >= 8, 3).astype(float)}, "NORMAL", 0.1)["maps"]["s"]
    assert separated["auroc"] == 1.0 and separated["auroc_ci"] == [1.0, 1.0]


def test_a_volume_of_scans_unlike_the_normals_says_so_beside_its_verdict(tmp_path):
    """An MRI volume given to an OCT model got 'abnormal' with no word that its slices were out of distribution."""
    import io

    from rich.console import Console

    from medvq.volume_outputs import write_volume_verdicts

    samples = _bscans("mri.dcm", 4, "", "P1") + _bscans("oct.dcm", 2, "", "P2")
    text = io.StringIO()
    write_volume_verdicts(
        tmp_path, samples, [9.0, 8.0, 9.5, 7.0, 1.0, 2.0], [np.zeros(16)] * 6, [0.0, 1.0, 2.0], score_name="s", map_name="s",
        fraction=0.1, vmax=3.0, threshold=2.5, operating_point="spec95", out_of_distribution=[True, True, False, True, False, False],
        console=Console(file=text, width=300),
    )  # fmt: skip
    lines = text.getvalue().splitlines()
    assert lines[0].endswith("; 3 of 4 B-scans OUT OF DISTRIBUTION: not to be trusted") and "OUT OF DISTRIBUTION" not in lines[1]
    with open(tmp_path / "volumes.csv") as f:
        assert [r["out_of_distribution_bscans"] for r in csv.DictReader(f)] == ["3", "0"]
    assert [v["out_of_distribution_bscans"] for v in json.loads((tmp_path / "volumes.json").read_text())["volumes"]] == [3, 0]


def test_scans_a_manifest_groups_into_a_volume_are_named_by_file_on_screen(tmp_path):
    """2D scans grouped by patient, eye and visit have no frame numbers: the line said 'most abnormal B-scans: None'."""
    import io

    from rich.console import Console

    from medvq.volume_outputs import write_volume_verdicts

    samples = [Sample(path=Path(f"oct/P1-{k}.png"), label="", patient_id="P1", eye="OD", visit="v1") for k in range(3)]
    text = io.StringIO()
    write_volume_verdicts(
        tmp_path, samples, [1.0, 5.0, 2.0], [np.zeros(16)] * 3, [0.0, 1.0], score_name="s", map_name="s", fraction=0.1, vmax=3.0,
        threshold=2.5, operating_point="spec95", console=Console(file=text, width=300),
    )  # fmt: skip
    line = text.getvalue().strip()
    assert line.startswith("volume P1 OD v1: 3 B-scans") and line.endswith("most abnormal B-scans: P1-1.png") and "None" not in line, line


def _volume_manifest(phantom: Path, folder: Path) -> Path:
    """Each patient's phantom scans of one class stacked as a DICOM OPT volume (single scans stay images)."""
    groups: dict[tuple, list[Sample]] = defaultdict(list)
    for s in scan_dataset(phantom):
        groups[(s.split, s.label, s.patient_id)].append(s)
    lines = ["path,label,patient,eye,split"]
    folder.mkdir()
    for (split, label, patient), items in sorted(groups.items()):
        if len(items) == 1:
            lines.append(f"{items[0].path},{label},{patient},OD,{split}")
            continue
        frames = np.stack([np.asarray(Image.open(s.path).convert("L")) for s in sorted(items, key=lambda s: s.path.name)])
        path = write_dicom_opt(folder / f"{label}-{patient}.dcm", frames, patient=patient, laterality="R")
        lines.append(f"{path},{label},{patient},OD,{split}")
    manifest = folder / "scans.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.slow
def test_oct_volumes_train_evaluate_and_get_a_verdict_each(tiny_phantom, nibabel_data, tmp_path):
    manifest = _volume_manifest(tiny_phantom, tmp_path / "volumes")
    run = tmp_path / "run"
    tiny = ["--image-size", "64", "--hidden-channels", "32", "--residual-channels", "16", "--residual-layers", "1", "--embedding-dim", "16",
            "--codebook-size", "32", "--downsample-layers", "2", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--samples-per-epoch", "0", "--min-images-per-epoch", "0"]  # fmt: skip
    result = runner.invoke(app, ["train", "vqvae", "--manifest", str(manifest), "--out", str(run), *tiny])
    assert result.exit_code == 0, result.output
    assert "train:" in result.output and "patients" in result.output  # the patient summary
    split = json.loads((run / "split.json").read_text())["splits"]
    assert any("frame" in item and item["path"].endswith(".dcm") for item in split["train"])  # B-scans of volumes trained

    result = runner.invoke(app, ["evaluate", str(run), "--manifest", str(manifest), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    volume_level = metrics["volume_level"]
    assert volume_level["counts"]["NORMAL"] >= 2 and volume_level["n_volumes"] > volume_level["counts"]["NORMAL"]
    assert 0.0 <= volume_level["maps"]["residual"]["auroc"] <= 1.0 and "volume level" in result.output
    lo, hi = volume_level["maps"]["residual"]["auroc_ci"]
    assert lo <= volume_level["maps"]["residual"]["auroc"] <= hi and "interval by patient" in result.output
    assert "<h2>Volumes</h2>" in (tmp_path / "eval" / "report.html").read_text()

    test_volume = sorted((tmp_path / "volumes").glob("CNV-*.dcm"))[0]
    out = tmp_path / "infer"
    result = runner.invoke(app, ["infer", str(run), str(test_volume), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    n = int(rows[0]["n_bscans"])
    assert len(rows) == 1 and rows[0]["patient"] == test_volume.stem.split("-", 1)[1] and rows[0]["eye"] == "OD"
    with open(out / "scores.csv") as f:
        bscan_rows = list(csv.DictReader(f))
    bscan_scores = [float(r[r["decision_map"]]) for r in bscan_rows]  # the run's primary map decides B-scans and volumes
    assert float(rows[0]["score"]) == pytest.approx(max(bscan_scores), rel=1e-5)  # top 10 % of <= 10 B-scans: the highest
    assert rows[0]["most_abnormal_bscans"] == str(int(np.argmax(bscan_scores)))
    assert float(rows[0]["threshold"]) == pytest.approx(float(bscan_rows[0]["threshold"]))  # the stored B-scan threshold
    assert rows[0]["decision"] == ("abnormal" if float(rows[0]["score"]) > float(rows[0]["threshold"]) else "normal")
    enface = np.load(out / "volumes" / f"{test_volume.stem}_enface.npy")
    assert enface.shape == (n, 128)  # B-scans x A-scan columns of the original scans
    assert Image.open(out / "volumes" / f"{test_volume.stem}_enface.png").size[0] == 128
    assert f"volume {test_volume.name}" in result.output

    # MRI: each volume of a 4D NIfTI series gets the same summary
    result = runner.invoke(app, ["infer", str(run), str(nibabel_data / "example4d.nii.gz"), "--out", str(tmp_path / "mri")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "mri" / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["volume"].rsplit("#", 1)[-1] if "#" in r["volume"] else "" for r in rows] == ["", "volume1"]
    with open(tmp_path / "mri" / "scores.csv") as f:
        slices = list(csv.DictReader(f))
    assert sum(int(r["n_bscans"]) for r in rows) == len(slices)
    assert np.load(tmp_path / "mri" / "volumes" / "example4d_volume1_enface.npy").shape[0] == int(rows[1]["n_bscans"])
