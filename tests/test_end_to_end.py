"""Train -> evaluate -> infer on a tiny phantom, as a user runs it (CLI and Python API)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medvq.cli import app
from medvq.config import build_config
from medvq.detector import Detector
from medvq.engine.train import train_run
from cli_runner import cli, evaluate_ok, train_ok

pytestmark = pytest.mark.slow
runner = CliRunner()

TINY = {
    "data": {"image_size": 64, "val_fraction": 0.2, "test_fraction": 0.3},
    "model": {"hidden_channels": 32, "residual_channels": 16, "residual_layers": 1, "embedding_dim": 16, "codebook_size": 32, "downsample_layers": 2},
    "train": {"epochs": 4, "batch_size": 16, "learning_rate": 3e-3, "device": "cpu", "samples_per_epoch": 4, "min_images_per_epoch": 0},
}


def _flags(extra: dict | None = None) -> list[str]:
    cfg = {**TINY, **(extra or {})}
    out = []
    for section in cfg.values():
        for k, v in section.items():
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def trained(tiny_phantom, tmp_path_factory) -> Path:
    return train_ok("vqvae", tiny_phantom, tmp_path_factory.mktemp("runs") / "run", *_flags())


@pytest.fixture(scope="module")
def evaluated(trained, tiny_phantom) -> Path:
    return evaluate_ok(trained, tiny_phantom)


def test_run_directory_holds_everything(trained):
    for rel in ("config.yaml", "split.json", "calibration.json", "metrics.csv", "model/best.safetensors", "model/last.safetensors",
                "plots/loss.png", "plots/codebook.png", "samples/epoch_001.png", "samples/epoch_004.png", "checkpoints/last.ckpt",
                "latents/train_codes.npz"):
        assert (trained / rel).is_file(), rel
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert all(0 < float(r["perplexity"]) <= 32 and 0 < float(r["codes_used"]) <= 1 for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    split = json.loads((trained / "split.json").read_text())
    train_labels = {x["label"] for x in split["splits"]["train"]}
    assert train_labels == {"NORMAL"}, "the VQ-VAE trains on NORMAL images only"
    codes = np.load(trained / "latents" / "train_codes.npz")
    assert codes["codes"].shape == (len(split["splits"]["train"]), 16, 16)
    assert yaml.safe_load((trained / "config.yaml").read_text())["model"]["codebook_size"] == 32


def test_loading_never_unpickles(trained, no_unpickling):
    det = Detector.load(trained)
    assert det.calibration is not None and det.model.training is False


def test_save_load_same_scores(trained, tiny_phantom):
    images = sorted((tiny_phantom / "test").rglob("*.jpeg"))[:6]
    a = Detector.load(trained).predict_files(images)
    b = Detector.load(trained).predict_files(images)
    for ra, rb in zip(a, b):
        assert ra.scores == rb.scores
        np.testing.assert_array_equal(ra.maps["combined"], rb.maps["combined"])
        assert ra.maps["combined"].shape == ra.image.shape


def test_evaluate_reports_the_stored_operating_point(evaluated, trained):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    calibration = json.loads((trained / "calibration.json").read_text())
    assert metrics["primary_map"] == calibration["primary_map"] and metrics["operating_point"] == "spec95"
    rows = list(csv.DictReader(open(evaluated / "scores.csv")))
    for name, m in metrics["maps"].items():
        op = m["operating_point"]
        assert op["threshold"] == calibration["stats"][name]["thresholds"]["spec95"]["value"]
        called = np.array([float(r[name]) > op["threshold"] for r in rows])
        normal = np.array([r["class"] == "NORMAL" for r in rows])
        c = op["confusion"]
        assert (c["tn"], c["fp"], c["fn"], c["tp"]) == ((~called & normal).sum(), (called & normal).sum(), (~called & ~normal).sum(), (called & ~normal).sum())
        assert op["specificity"] == pytest.approx(c["tn"] / normal.sum()) and op["sensitivity"] == pytest.approx(c["tp"] / (~normal).sum())
        lo, hi = m["image_auroc_ci"]  # bootstrap by patient
        assert lo <= m["image_auroc"] <= hi and hi - lo > 0
        for c, (lo, hi) in m["image_auroc_per_class_ci"].items():
            assert lo <= m["image_auroc_per_class"][c] <= hi
            assert (c in m["unreliable_classes"]) == (m["n_abnormal_per_class"][c] < 10)
    page = (evaluated / "report.html").read_text()
    for text in ("Highest-scoring NORMAL scans", "Lowest-scoring abnormal scans", "medvq version", "Training curves", "Primary map", "stored operating point"):
        assert text in page
    assert metrics["provenance"]["method"] == "vqvae" and len(metrics["provenance"]["training_history"]) == 4  # one row per epoch
    for name in ("roc", "training"):
        assert (evaluated / "figures" / f"{name}.png").stat().st_size > 1000
        assert (evaluated / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_evaluate_writes_metrics_scores_and_report(evaluated, tiny_phantom):
    m = json.loads((evaluated / "metrics.json").read_text())
    assert set(m["maps"]) == {"residual", "alm", "perceptual", "combined"}
    for name, v in m["maps"].items():
        for key in ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "dice", "image_auroc_by_width"):
            assert key in v, (name, key)
        assert set(v["image_auroc_per_class"]) == {"CNV", "DME", "DRUSEN"}
        assert 0 <= v["image_auroc"] <= 1 and 0 <= v["aupro"] <= 1
        lo, hi = v["pixel_auroc_ci"]  # phantom patients have ids: resampled by patient
        assert lo <= v["pixel_auroc"] <= hi and v["pixel_auroc_ci_by"] == "patient"
    rows = list(csv.DictReader(open(evaluated / "scores.csv")))
    assert len(rows) == m["n_images"] and {"path", "class", "patient", "residual", "alm", "perceptual", "combined"} <= set(rows[0])
    test_files = {str(p) for p in (tiny_phantom / "test").rglob("*.jpeg")}
    assert {r["path"] for r in rows} == test_files
    html = (evaluated / "report.html").read_text()
    assert html.count("data:image/png;base64") > 10 and "AUPRO" in html
    lo, hi = m["maps"]["combined"]["pixel_auroc_ci"]
    assert f"{lo:.2f}–{hi:.2f}" in html, "the pixel AUROC's interval under it"


def test_validation_split_scores_every_image_of_the_validation_patients(trained, tiny_phantom, tmp_path):
    out = tmp_path / "val-eval"
    result = runner.invoke(app, ["evaluate", str(trained), "--data", str(tiny_phantom), "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {r["path"] for r in rows} == {str(p) for p in (tiny_phantom / "val").rglob("*.jpeg")}
    assert {r["class"] for r in rows} == {"NORMAL", "CNV", "DME", "DRUSEN"}, "abnormal scans of the validation patients too"
    train_patients = {item["patient_id"] for item in json.loads((trained / "split.json").read_text())["splits"]["train"]}
    assert not train_patients & {r["patient"] for r in rows}
    assert json.loads((out / "metrics.json").read_text())["split"] == "val"
    result = runner.invoke(app, ["evaluate", str(trained), "--data", str(tiny_phantom), "--split", "holdout", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'test', 'val' or 'all'" in result.output


def test_maps_light_up_on_planted_lesions(evaluated):
    """Even a 4-epoch model at 64 px ranks lesion pixels above normal retina."""
    m = json.loads((evaluated / "metrics.json").read_text())
    assert max(v["pixel_auroc"] for v in m["maps"].values()) > 0.75


def test_report_rebuilds_from_saved_outputs(evaluated):
    before = (evaluated / "report.html").read_text()
    (evaluated / "report.html").unlink()
    result = runner.invoke(app, ["report", str(evaluated)])
    assert result.exit_code == 0, result.output
    assert (evaluated / "report.html").read_text() == before


def test_infer_writes_maps_overlays_and_scores(trained, tiny_phantom, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in sorted((tiny_phantom / "test" / "DME").glob("*.jpeg"))[:3]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "infer"
    result = runner.invoke(app, ["infer", str(trained), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 3 and all(float(r["combined_normal_percentile"]) >= 0 for r in rows)
    for r in rows:
        assert (out / "overlays" / f"{r['name']}.png").is_file()
        m = np.load(out / "maps" / f"{r['name']}_combined.npy")
        assert m.shape == (128, 128)
    calibration = json.loads((trained / "calibration.json").read_text())
    primary = calibration["primary_map"]
    assert primary in calibration["stats"] and "validation AUROC" in calibration["primary_reason"]  # the phantom's val patients include lesions
    stored = calibration["stats"][primary]["thresholds"]
    for r in rows:  # the decision: the primary map's score against its stored spec95 threshold
        assert r["decision_map"] == primary and r["operating_point"] == "spec95"
        assert float(r["threshold"]) == pytest.approx(stored["spec95"]["value"], rel=1e-4)
        assert r["abnormal"] == str(int(float(r[primary]) > stored["spec95"]["value"]))
    low = float(min(r["alm"] for r in rows)) - 1.0
    result = runner.invoke(app, ["infer", str(trained), str(folder), "--out", str(tmp_path / "infer2"), "--map", "alm", "--threshold", str(low), "--contour"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    drawn = Image.open(tmp_path / "infer2" / "overlays" / f"{rows[0]['name']}.png")
    scan = Image.open(rows[0]["path"])
    assert drawn.width > scan.width and drawn.height > scan.height  # colour bar on the right, caption strip below
    assert "3 called abnormal on 'alm'" in result.output
    rows = list(csv.DictReader(open(tmp_path / "infer2" / "scores.csv")))
    assert all(r["decision_map"] == "alm" and r["operating_point"] == "value" and r["abnormal"] == "1" for r in rows)
    for bad, message in ((["--threshold", "spec90"], "unknown threshold 'spec90'"), (["--map", "nll"], "no map or score 'nll'")):
        result = runner.invoke(app, ["infer", str(trained), str(folder), "--out", str(tmp_path / "bad"), *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_resume_continues_after_a_crash(tiny_phantom, tmp_path, monkeypatch):
    from medvq.models.vqvae.lightning import VQVAEModule

    cfg = build_config({**TINY, "train": {**TINY["train"], "epochs": 2}})
    run = tmp_path / "run"
    original = VQVAEModule.training_step

    def crash_in_third_epoch(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(VQVAEModule, "training_step", crash_in_third_epoch)
    cfg4 = build_config({**TINY, "train": {**TINY["train"], "epochs": 4}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(cfg4, tiny_phantom, run, progress=False)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2], "finished epochs survive the crash"
    assert (run / "model" / "best.safetensors").is_file()
    monkeypatch.setattr(VQVAEModule, "training_step", original)

    result = runner.invoke(app, ["train", "vqvae", "--data", str(tiny_phantom), "--out", str(run), "--resume", "--epochs", "4"])
    assert result.exit_code == 0, result.output
    rows2 = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows, "resuming keeps the finished epochs as they were"
    assert (run / "calibration.json").is_file()
    del cfg


def test_bad_inputs_get_one_line_errors(tiny_phantom, trained, tmp_path):
    code, out = cli("train", "vqvae", "--data", tmp_path / "missing", "--out", tmp_path / "r1")
    assert code == 2 and "missing: data folder not found" in out

    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    code, out = cli("train", "vqvae", "--data", tmp_path / "empty", "--out", tmp_path / "r2")
    assert code == 2 and "no images" in out and "empty" in out

    code, out = cli("train", "vqvae", "--data", tiny_phantom, "--out", tmp_path / "r3", "--train-classes", "HEALTHY")
    assert code == 2 and "HEALTHY" in out and "NORMAL" in out

    code, out = cli("train", "vqvae", "--data", tiny_phantom, "--out", tmp_path / "r4", "--image-size", "66")
    assert code == 2 and "multiple of the model stride 8" in out and "use e.g. 64" in out

    code, out = cli("train", "vqvae", "--data", tiny_phantom, "--out", trained)
    assert code == 2 and "not empty" in out and "--resume" in out

    code, out = cli("train", "vqvae", "--data", tiny_phantom, "--out", trained, "--resume", "--codebook-size", "64")
    assert code == 2 and "model.codebook_size" in out


def test_checkpoint_from_a_different_config_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["hidden_channels"] = 48
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("infer", other, trained / "samples", "--out", tmp_path / "o")
    assert code == 2 and "best.safetensors" in out and "different configuration" in out


def test_corrupt_scan_named_and_earlier_results_kept(trained, tiny_phantom, tmp_path):
    good = sorted((tiny_phantom / "test" / "NORMAL").glob("*.jpeg"))[0]
    out = tmp_path / "infer"
    code, _ = cli("infer", trained, good, "--out", out)
    assert code == 0
    before = (out / "scores.csv").read_bytes()
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, msg = cli("infer", trained, bad, "--out", out)
    assert code == 2 and "bad.jpeg" in msg and "cannot read image" in msg
    assert (out / "scores.csv").read_bytes() == before


def test_unreadable_file_among_good_ones_is_skipped_and_counted(trained, tiny_phantom, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((tiny_phantom / "test" / "NORMAL").glob("*.jpeg"))[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "a_bad.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "z_bad.png").write_bytes(b"not a png")
    code, msg = cli("infer", trained, folder, "--out", tmp_path / "out")
    assert code == 0, msg
    msg = " ".join(msg.split())
    assert "2 file(s) could not be read and were skipped; the first:" in msg and "a_bad.jpeg: cannot read image" in msg
    assert "3 scans scored" in msg
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert sorted(r["name"] for r in rows) == sorted(p.stem for p in good)


def test_evaluate_leaves_out_an_unreadable_test_file(trained, tiny_phantom, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    (data / "test" / "NORMAL" / "NORMAL-999999-1.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a patient of its own: a test patient
    code, msg = cli("evaluate", trained, "--data", data, "--out", tmp_path / "eval")
    assert code == 0, msg
    assert "1 test file(s) could not be read and were left out" in " ".join(msg.split()) and "NORMAL-999999-1.jpeg" in msg
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["excluded_unreadable"] == 1


def test_guard_flags_an_mri_slice_given_to_the_oct_model(trained, tiny_phantom, colin27, tmp_path):
    import nibabel as nib
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    volume = np.asarray(nib.load(colin27).dataobj, dtype=np.float32)
    mri = volume[:, :, volume.shape[2] // 2].T[::-1]  # a mid axial slice of the brain
    Image.fromarray((255 * mri / mri.max()).astype(np.uint8)).save(folder / "colin27_axial.png")
    for p in sorted((tiny_phantom / "test" / "NORMAL").glob("*.jpeg"))[:4]:
        shutil.copy(p, folder / p.name)
    result = runner.invoke(app, ["infer", str(trained), str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 of 5 scans look unlike the normal scans" in " ".join(result.output.split())
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert rows["colin27_axial"]["in_distribution"] == "0"
    assert all(r["in_distribution"] == "1" for n, r in rows.items() if n != "colin27_axial")
    guard = json.loads((trained / "calibration.json").read_text())["ood_guard"]
    assert float(rows["colin27_axial"]["ood_distance"]) > guard["threshold"] == 1.0  # distances in units of the parts' thresholds
    assert guard["feature_threshold"] > max(guard["normal_distances"])
    assert guard["appearance"]["threshold"] > max(guard["appearance"]["normal_distances"]) and guard["appearance"]["n_reference"] > guard["n_normals"]
