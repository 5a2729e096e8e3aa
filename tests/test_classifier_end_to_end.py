"""Classifier runs as a user makes them: train, resume, evaluate, explain, infer, on a tiny phantom."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medvq.detector import Detector
from cli_runner import cli, cli_ok, evaluate_ok, train_ok

pytestmark = pytest.mark.slow

COMMON = ["--image-size", "64", "--batch-size", "16", "--device", "cpu", "--min-images-per-epoch", "0", "--samples-per-epoch", "4", "--learning-rate", "2e-3"]
VIT = ["--arch", "vit", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--epochs", "2"]


@pytest.fixture(scope="module")
def vit_run(tiny_phantom, tmp_path_factory) -> Path:
    return train_ok("classifier", tiny_phantom, tmp_path_factory.mktemp("clf") / "vit", *VIT, *COMMON)


@pytest.fixture(scope="module")
def vit_eval(vit_run, tiny_phantom) -> Path:
    return evaluate_ok(vit_run, tiny_phantom, expect="classification: accuracy")


def test_run_trains_on_every_class_and_calibrates_on_normals(vit_run):
    cfg = yaml.safe_load((vit_run / "config.yaml").read_text())
    assert cfg["method"] == "classifier" and cfg["model"]["classes"] == ["NORMAL", "ABNORMAL"]
    assert cfg["model"]["vit_input_size"] == 64 and len(cfg["model"]["class_weights"]) == 2
    split = json.loads((vit_run / "split.json").read_text())
    assert {x["label"] for x in split["splits"]["train"]} == {"NORMAL", "CNV", "DME", "DRUSEN"}
    n_val_normal = sum(x["label"] == "NORMAL" for x in split["splits"]["val"])
    calibration = json.loads((vit_run / "calibration.json").read_text())
    assert calibration["n_images"] == n_val_normal < len(split["splits"]["val"])
    assert {"gradcam", "rollout", "gradient_rollout", "combined", "p_abnormal"} <= set(calibration["stats"])
    rows = list(csv.DictReader(open(vit_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["val_auroc"]) <= 1 and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    for rel in ("model/best.safetensors", "model/last.safetensors", "checkpoints/last.ckpt", "samples/epoch_002.png", "plots/loss.png"):
        assert (vit_run / rel).is_file(), rel


def test_loading_never_unpickles(vit_run, no_unpickling, tiny_phantom):
    det = Detector.load(vit_run)
    results = det.predict_files(sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:2])
    assert {"gradcam", "rollout", "gradient_rollout", "p_abnormal"} <= set(results[0].scores)
    assert 0 <= results[0].scores["p_abnormal"]["score"] <= 1


def test_evaluate_reports_classification_and_scores_the_maps_on_lesion_masks(vit_eval):
    m = json.loads((vit_eval / "metrics.json").read_text())
    c = m["classification"]
    assert c["classes"] == ["NORMAL", "ABNORMAL"] and c["n_images"] == m["n_images"]
    assert np.array(c["confusion_matrix"]).sum() == m["n_images"]
    for key in ("accuracy", "balanced_accuracy", "auroc_abnormal"):
        assert 0 <= c[key] <= 1, key
    assert set(c["sensitivity"]) == set(c["specificity"]) == {"NORMAL", "ABNORMAL"}
    assert set(c["called_abnormal_per_label"]) == {"NORMAL", "CNV", "DME", "DRUSEN"}
    assert m["maps"]["p_abnormal"]["image_auroc"] == pytest.approx(c["auroc_abnormal"])
    for name in ("gradcam", "rollout", "gradient_rollout"):
        v = m["maps"][name]
        assert 0 <= v["pixel_auroc"] <= 1 and 0 <= v["pointing_game"] <= 1, name
    assert m["pointing_tolerance_px"] == pytest.approx(64 * 15 / 224)
    html = (vit_eval / "report.html").read_text()
    assert "Classification" in html and "Confusion matrix" in html and "pointing game" in html
    rows = list(csv.DictReader(open(vit_eval / "scores.csv")))
    assert len(rows) == m["n_images"] and "p_abnormal" in rows[0]
    before = html
    (vit_eval / "report.html").unlink()
    assert cli("report", vit_eval)[0] == 0
    assert (vit_eval / "report.html").read_text() == before


@pytest.mark.parametrize("method, name", [("rollout", "rollout"), ("gradcam", "gradcam"), ("gradient-rollout", "gradient_rollout")])
def test_explain_writes_maps_overlays_and_predictions(vit_run, tiny_phantom, tmp_path, method, name):
    folder = tiny_phantom / "test" / "DRUSEN"
    out = tmp_path / "explain"
    cli_ok("explain", vit_run, folder, "--map", method, "--out", out)
    rows = list(csv.DictReader(open(out / "explanations.csv")))
    assert len(rows) == len(list(folder.glob("*.jpeg")))
    for r in rows:
        assert r["map"] == name and r["predicted"] in ("NORMAL", "ABNORMAL")
        assert float(r["p_NORMAL"]) + float(r["p_ABNORMAL"]) == pytest.approx(1, abs=1e-4)
        assert r["overlay_scale"].startswith("normal-calibrated")
        m = np.load(out / "maps" / f"{r['name']}_{name}.npy")
        assert m.shape == (128, 128) and np.isfinite(m).all()  # the scan's own grid
        assert (out / "overlays" / f"{r['name']}_{name}.png").is_file()


def test_explain_and_infer_an_oct_volume_bscan_by_bscan(vit_run, tiny_phantom, tmp_path):
    from PIL import Image
    from volume_files import write_dicom_opt

    scans = sorted((tiny_phantom / "test" / "DRUSEN").glob("*.jpeg"))[:3]
    volume = write_dicom_opt(tmp_path / "drusen.dcm", np.stack([np.asarray(Image.open(p).convert("L")) for p in scans]), patient="P9")
    cli_ok("explain", vit_run, volume, "--map", "rollout", "--out", tmp_path / "explain")
    rows = list(csv.DictReader(open(tmp_path / "explain" / "explanations.csv")))
    assert [r["name"] for r in rows] == [f"drusen_frame00{i}" for i in range(len(scans))]
    assert np.load(tmp_path / "explain" / "maps" / "drusen_frame001_rollout.npy").shape == (128, 128)
    cli_ok("infer", vit_run, volume, "--out", tmp_path / "infer")
    verdicts = list(csv.DictReader(open(tmp_path / "infer" / "volumes.csv")))
    assert len(verdicts) == 1 and verdicts[0]["patient"] == "P9" and int(verdicts[0]["n_bscans"]) == len(scans)
    assert verdicts[0]["decision"] in ("abnormal", "normal")


def test_infer_reports_p_abnormal_next_to_the_maps(vit_run, tiny_phantom, tmp_path):
    out = tmp_path / "infer"
    cli_ok("infer", vit_run, tiny_phantom / "test" / "CNV", "--out", out)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert rows and all(0 <= float(r["p_abnormal"]) <= 1 and 0 <= float(r["p_abnormal_normal_percentile"]) <= 100 for r in rows)
    assert {"gradcam", "rollout", "gradient_rollout", "combined"} <= set(rows[0])


def test_explaining_leaves_the_loaded_detector_as_it_was(vit_run):
    from medvq.explain import explaining_detector

    loaded = Detector.load(vit_run)
    before, maps_before, guard = loaded.config.model_dump(mode="json"), loaded.map_names, loaded.calibration.guard
    explained = explaining_detector(loaded, "rollout", {"rollout_head_fusion": "max", "rollout_discard_ratio": 0.5}, vit_run)
    assert loaded.config.model_dump(mode="json") == before and loaded.map_names == maps_before
    assert loaded.model.config == loaded.config.model and loaded.calibration.guard is guard
    assert explained.config.model.rollout_head_fusion == "max" and explained.model.config.rollout_discard_ratio == 0.5
    assert explained.map_names == ["rollout"] and explained.calibration.guard is None
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(explained.predict(x).extras["probabilities"], loaded.predict(x).extras["probabilities"])  # the same weights


def test_explain_settings_and_bad_requests(vit_run, tiny_phantom, tmp_path):
    scan = sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[0]
    cli_ok("explain", vit_run, scan, "--map", "rollout", "--rollout-head-fusion", "max", "--rollout-discard-ratio", "0.9", "--out", tmp_path / "a")
    row = next(csv.DictReader(open(tmp_path / "a" / "explanations.csv")))
    assert "display only" in row["overlay_scale"]  # the run's calibration does not apply to other settings
    code, text = cli("explain", vit_run, scan, "--map", "saliency", "--out", tmp_path / "b")
    assert code == 2 and "rollout, gradcam or gradient-rollout" in text
    code, text = cli("explain", vit_run, scan, "--map", "rollout", "--rollout-discard-ratio", "1.5", "--out", tmp_path / "c")
    assert code == 2 and "invalid explanation setting" in text


def test_pretrained_lite0_four_classes_resume_evaluate_and_explain(tiny_phantom, tmp_path):
    run = tmp_path / "lite0"
    args = ["train", "classifier", "--data", tiny_phantom, "--out", run, "--arch", "efficientnet-lite0", "--task", "4class", *COMMON]
    cli_ok(*args, "--epochs", "1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] == "imagenet" and cfg["model"]["classes"] == ["NORMAL", "CNV", "DME", "DRUSEN"]
    cli_ok("train", "classifier", "--data", tiny_phantom, "--out", run, "--resume", "--epochs", "2")
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [1, 2]

    cli_ok("evaluate", run, "--data", tiny_phantom, "--out", tmp_path / "eval")
    c = json.loads((tmp_path / "eval" / "metrics.json").read_text())["classification"]
    assert np.array(c["confusion_matrix"]).shape == (4, 4)
    assert set(c["auroc_one_vs_rest"]) == {"NORMAL", "CNV", "DME", "DRUSEN"} and 0 <= c["auroc_macro"] <= 1

    code, text = cli("explain", run, tiny_phantom / "test" / "DME", "--map", "rollout", "--out", tmp_path / "x")
    assert code == 2 and "needs attention weights" in text and "--map gradcam" in text
    cli_ok("explain", run, tiny_phantom / "test" / "DME", "--map", "gradcam", "--gradcam-layer", "_blocks.10", "--out", tmp_path / "x")


def test_explain_lists_a_volume_s_slices_as_the_run_reads_them(tiny_phantom, colin27, tmp_path):
    """A run that slices NIfTI volumes coronally: explain scores the same slices as infer (not the default axial ones)."""
    run = train_ok("classifier", tiny_phantom, tmp_path / "coronal", *VIT, *COMMON, "--epochs", "1", "--slice-axis", "coronal")
    cli_ok("explain", run, colin27, "--map", "rollout", "--out", tmp_path / "explain")
    cli_ok("infer", run, colin27, "--out", tmp_path / "infer", "--no-overlays")
    explained = list(csv.DictReader(open(tmp_path / "explain" / "explanations.csv")))
    inferred = list(csv.DictReader(open(tmp_path / "infer" / "scores.csv")))
    assert len(explained) == len(inferred) > 181  # Colin27 has 217 coronal slices against 181 axial ones
