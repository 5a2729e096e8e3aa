"""VQ-VAE-2 end to end on real MRI (Colin27 T1 and nibabel's NIfTI files) and on OCT phantoms, through the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medvq.data.nifti import VolumeOptions, scan_nifti_file
from medvq.detector import Detector
from medvq.evaluation.reconstruction import ssim_per_image
from cli_runner import cli, cli_ok, evaluate_ok, train_ok

pytestmark = pytest.mark.slow

TINY = [
    "--image-size", "64", "--epochs", "2", "--batch-size", "8", "--learning-rate", "3e-3", "--device", "cpu",
    "--min-images-per-epoch", "0", "--samples-per-epoch", "4", "--hidden-channels", "16", "--residual-channels", "8",
    "--residual-layers", "1", "--embedding-dim", "8", "--codebook-size-top", "16", "--codebook-size-bottom", "32",
]  # fmt: skip

# HipMRI-style cases cut from Colin27: (split folder, case id, slice size, axial slices)
CASES = [
    ("train", "101", (256, 128), range(40, 88, 4)),
    ("train", "102", (256, 144), range(42, 90, 4)),
    ("validate", "201", (256, 128), range(100, 124, 4)),
    ("test", "301", (256, 144), range(130, 154, 4)),
]


@pytest.fixture(scope="module")
def hipmri(colin27, tmp_path_factory) -> Path:
    """ROOT/{train,validate,test}/case_<pid>_week_<w>_slice_<s>.nii.gz, 256x128 and 256x144 slices of real MRI."""
    root = tmp_path_factory.mktemp("hipmri")
    volume = np.asanyarray(nib.as_closest_canonical(nib.load(colin27)).dataobj).astype(np.float32) * 7.5  # MRI-like scale
    for split, case, size, zs in CASES:
        for k, z in enumerate(zs):
            section = np.flipud(volume[:, :, z].T)
            section = ndimage.zoom(section, (size[0] / section.shape[0], size[1] / section.shape[1]), order=1)
            path = root / split / f"case_{case}_week_{k % 2}_slice_{z}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(section.astype(np.float32), np.eye(4)), path)
    return root


@pytest.fixture(scope="module")
def trained(hipmri, tmp_path_factory) -> Path:
    return train_ok("vqvae2", hipmri, tmp_path_factory.mktemp("runs") / "mri", *TINY)


@pytest.fixture(scope="module")
def evaluated(trained, hipmri) -> Path:
    return evaluate_ok(trained, hipmri, expect="reconstruction of 6 test images: SSIM")


def test_run_directory_of_a_vqvae2(trained):
    for rel in ("config.yaml", "split.json", "calibration.json", "metrics.csv", "model/best.safetensors", "model/last.safetensors",
                "plots/loss.png", "plots/codebook.png", "plots/ssim.png", "samples/epoch_001.png", "samples/epoch_002.png",
                "checkpoints/last.ckpt", "latents/train_codes.npz"):
        assert (trained / rel).is_file(), rel
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "train_ssim", "val_ssim", "val_commit_top", "val_commit_bottom", "perplexity_top", "codes_used_bottom", "seconds"):
        assert all(r[key] != "" for r in rows), key
    assert all(-1 <= float(r["val_ssim"]) <= 1 for r in rows) and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    split = json.loads((trained / "split.json").read_text())["splits"]
    assert {x["patient_id"] for x in split["train"]} == {"101", "102"} and {x["patient_id"] for x in split["val"]} == {"201"}
    assert len(split["train"]) == 24 and {x["label"] for x in split["train"]} == {""}
    codes = np.load(trained / "latents" / "train_codes.npz")
    assert codes["codes"].shape == (24, 16, 16) and codes["top_codes"].shape == (24, 8, 8)
    assert codes["codes"].max() < 32 and codes["top_codes"].max() < 16


def test_mri_evaluation_is_reconstruction_only(evaluated, hipmri, trained):
    m = json.loads((evaluated / "metrics.json").read_text())
    assert m["maps"] == {} and m["counts"] == {"unlabelled": 6} and m["n_patients"] == 1
    rec = m["reconstruction"]
    assert rec["n_images"] == 6 and rec["data_range"] == 1.0
    assert 0 < rec["ssim"] <= 1 and rec["psnr"] > 5 and 0 < rec["mse"] < 0.25
    rows = list(csv.DictReader(open(evaluated / "reconstruction.csv")))
    assert len(rows) == 6 and {r["patient"] for r in rows} == {"301"} and {r["frame"] for r in rows} == {""}
    assert np.mean([float(r["ssim"]) for r in rows]) == pytest.approx(rec["ssim"], rel=1e-4)
    page = (evaluated / "report.html").read_text()
    assert "Reconstruction" in page and "|error|" in page and page.count("data:image/png;base64") >= 18
    assert "ROC curves" not in page
    # the inference path (Detector.predict_files) reads, normalises and reconstructs the test slices the same way
    files = sorted((hipmri / "test").glob("*.nii.gz"))
    detector = Detector.load(trained)
    results = detector.predict_files(files)
    ssim = ssim_per_image(torch.tensor(np.stack([r.reconstruction for r in results]))[:, None], torch.tensor(np.stack([r.model_input for r in results]))[:, None])
    by_file = {Path(r["path"]).name: float(r["ssim"]) for r in rows}
    np.testing.assert_allclose(ssim.numpy(), [by_file[f.name] for f in files], atol=2e-3)  # float16 storage in evaluation
    code, _ = cli("report", evaluated)
    assert code == 0


def test_resume_continues_a_vqvae2_run(hipmri, tmp_path):
    run = tmp_path / "run"
    flags = [f for f in TINY]
    flags[flags.index("--epochs") + 1] = "1"
    cli_ok("train", "vqvae2", "--data", hipmri, "--out", run, *flags)
    first = list(csv.DictReader(open(run / "metrics.csv")))
    cli_ok("train", "vqvae2", "--data", hipmri, "--out", run, "--resume", "--epochs", "2")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and rows[0] == first[0]
    assert (run / "samples" / "epoch_002.png").is_file() and (run / "plots" / "ssim.png").is_file()


def test_volumes_train_evaluate_and_infer(colin27, nibabel_data, tmp_path):
    """3D and 4D volumes taken slice by slice: Colin27 and nibabel's anatomical.nii train, a 4D series validates, a NIfTI-2 series tests."""
    root = tmp_path / "volumes"
    for split, source in (("train", colin27), ("train", nibabel_data / "anatomical.nii"), ("val", nibabel_data / "example4d.nii.gz"), ("test", nibabel_data / "example_nifti2.nii.gz")):
        (root / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / split / Path(source).name)
    run = tmp_path / "run"
    cli_ok("train", "vqvae2", "--data", root, "--out", run, *TINY, "--max-train-images", "32", "--series-volumes", "first")
    split = json.loads((run / "split.json").read_text())["splits"]
    assert {x["patient_id"] for x in split["train"]} <= {"ch2", "anatomical"} and {x["patient_id"] for x in split["val"]} == {"example4d"}
    assert all("frame" in x for x in split["train"])
    cli_ok("evaluate", run, "--data", root, "--out", tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = len(scan_nifti_file(nibabel_data / "example_nifti2.nii.gz", VolumeOptions(series_volumes="first")))
    assert m["reconstruction"]["n_images"] == expected == 12 and 0 < m["reconstruction"]["ssim"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert len(rows) == 12 and sorted(int(r["frame"]) for r in rows) == sorted({int(r["frame"]) for r in rows})
    cli_ok("infer", run, nibabel_data / "anatomical.nii", "--out", tmp_path / "infer")
    inferred = list(csv.DictReader(open(tmp_path / "infer" / "scores.csv")))
    assert len(inferred) == 25 and inferred[3]["frame"] == "3" and inferred[3]["name"] == "anatomical_frame003"
    assert np.load(tmp_path / "infer" / "maps" / "anatomical_frame003_residual.npy").shape == (41, 33)


def test_vqvae2_on_oct_plugs_into_anomaly_evaluation(tiny_phantom, tmp_path):
    run = tmp_path / "oct"
    cli_ok("train", "vqvae2", "--data", tiny_phantom, "--out", run, *TINY)
    cli_ok("evaluate", run, "--data", tiny_phantom, "--out", tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(m["maps"]) == {"residual", "alm_top", "alm_bottom", "combined"}
    assert all(0 <= v["image_auroc"] <= 1 and "pixel_auroc" in v for v in m["maps"].values())
    assert set(m["reconstruction"]["by_class"]) == {"NORMAL", "CNV", "DME", "DRUSEN"} and 0 < m["reconstruction"]["ssim"] <= 1
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "ROC curves" in page and "Reconstruction" in page


def test_bad_nifti_inputs_are_named_and_nothing_written_is_lost(hipmri, trained, evaluated, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hipmri, bad)
    victim = sorted((bad / "train").glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:400])  # truncated in transfer
    code, out = cli("train", "vqvae2", "--data", bad, "--out", tmp_path / "r1", *TINY)
    assert code == 2 and victim.name in out and "cannot read NIfTI data" in out
    assert not (tmp_path / "r1").exists(), "no run directory is left behind by a bad file"

    zero = bad / "test" / "case_302_week_0_slice_1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 128), np.float32), np.eye(4)), zero)
    shutil.copy(sorted((hipmri / "train").glob("*.nii.gz"))[0], victim)
    code, out = cli("evaluate", trained, "--data", bad, "--out", tmp_path / "e1")
    assert code == 0 and zero.name in out and "zero-filled" in out and "left out" in out, "an unreadable slice among readable ones is skipped, named and counted"

    four_d = bad / "test" / "case_303_week_0_slice_2.nii.gz"
    zero.unlink()
    img = nib.Nifti1Image(np.ones((32, 32, 4, 3), np.float32), np.eye(4))
    img.header.set_intent("vector")
    nib.save(img, four_d)
    before = {str(p.relative_to(evaluated)): p.read_bytes() for p in evaluated.rglob("*") if p.is_file()}
    code, out = cli("evaluate", trained, "--data", bad, "--out", evaluated)
    assert code == 2 and four_d.name in out and "unexpected axis" in out
    after = {str(p.relative_to(evaluated)): p.read_bytes() for p in evaluated.rglob("*") if p.is_file()}
    assert after == before, "the earlier evaluation is untouched"
