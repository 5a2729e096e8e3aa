"""medvq train prior -> evaluate -> sample on a tiny phantom, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.models.prior.anomaly_map import COMBINATIONS
from cli_runner import cli, cli_ok, train_ok

pytestmark = pytest.mark.slow

VQ_FLAGS = [
    "--image-size", "64", "--val-fraction", "0.2", "--test-fraction", "0.3", "--hidden-channels", "32", "--residual-channels", "16",
    "--residual-layers", "1", "--embedding-dim", "16", "--codebook-size", "32", "--downsample-layers", "2",
]
TRAIN_FLAGS = ["--epochs", "2", "--batch-size", "16", "--learning-rate", "3e-3", "--device", "cpu", "--samples-per-epoch", "2", "--min-images-per-epoch", "0"]
KIND_FLAGS = {
    "fusion": ["--kind", "fusion", "--encoder", "efficientnet-lite0", "--fusion-channels", "16", "--fusion-blocks", "1"],
    "autoregressive": ["--kind", "autoregressive", "--embed-dim", "32", "--layers", "2", "--heads", "2"],
}


@pytest.fixture(scope="module")
def vqvae_run(tiny_phantom, tmp_path_factory) -> Path:
    return train_ok("vqvae", tiny_phantom, tmp_path_factory.mktemp("prior-runs") / "vqvae", *VQ_FLAGS, *TRAIN_FLAGS)


@pytest.fixture(scope="module", params=["fusion", "autoregressive"])
def prior_run(request, vqvae_run, tiny_phantom) -> Path:
    return train_ok("prior", tiny_phantom, vqvae_run.parent / request.param, "--vqvae", vqvae_run, *KIND_FLAGS[request.param], *TRAIN_FLAGS)


def test_prior_run_reuses_the_vqvae_split_and_holds_its_frozen_weights(prior_run, vqvae_run):
    run = RunDir(prior_run)
    config = run.read_config()
    vq_config = RunDir(vqvae_run).read_config()
    assert config.method == "prior" and config.model.vqvae_run == str(vqvae_run.resolve())
    assert config.model.vqvae_config == vq_config.model and config.data == vq_config.data and config.model.latent_grid == [16, 16]
    assert json.loads(run.split.read_text()) == json.loads(RunDir(vqvae_run).split.read_text())
    assert {s["label"] for s in json.loads(run.split.read_text())["splits"]["train"]} == {"NORMAL"}
    prior_weights, vq_weights = load_file(run.weights("best")), load_file(RunDir(vqvae_run).weights("best"))
    for k, v in vq_weights.items():  # the frozen VQ-VAE is the trained one, unchanged by the prior's training
        assert torch.equal(prior_weights[f"vqvae.{k}"], v), k
    rows = (prior_run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss") and "val_code_accuracy" in rows[0] and len(rows) == 3
    assert (prior_run / "samples" / "epoch_002.png").is_file()


def test_checkpoint_round_trip_without_pickle(prior_run, tiny_phantom, no_unpickling):
    a, b = Detector.load(prior_run), Detector.load(prior_run)
    assert a.map_names == ["nll", "residual", "alm", "perceptual"] and a.calibration.combinations == list(COMBINATIONS)
    files = sorted((tiny_phantom / "test").rglob("*.jpeg"))[:4]
    for ra, rb in zip(a.predict_files(files), b.predict_files(files)):
        assert ra.scores == rb.scores
        assert set(ra.maps) == {"nll", "residual", "alm", "perceptual", "combined", *COMBINATIONS}
        np.testing.assert_array_equal(ra.maps["nll+alm"], rb.maps["nll+alm"])
        assert ra.maps["nll"].shape == ra.image.shape


def test_evaluate_reports_nll_and_its_combinations(prior_run, tiny_phantom):
    out = prior_run / "eval"
    cli_ok("evaluate", prior_run, "--data", tiny_phantom, "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["maps"]) == {"nll", "residual", "alm", "perceptual", "combined", *COMBINATIONS}
    reference = json.loads((out / "metrics.json").read_text())["maps"]["alm"].keys()
    for name, m in metrics["maps"].items():
        assert m.keys() == reference, name
        assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_auroc"] <= 1.0 and 0.0 <= m["aupro"] <= 1.0
    header = (out / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"nll", "nll+alm", "nll+residual"} <= set(header)
    assert (out / "report.html").is_file() and "nll+alm" in (out / "report.html").read_text()


def test_sample_writes_decoded_images_or_refuses_a_fusion_prior(prior_run, tmp_path):
    kind = RunDir(prior_run).read_config().model.kind
    out = tmp_path / "samples"
    code, text = cli("sample", prior_run, "-n", "3", "--out", out, "--temperature", "0.8", "--top-k", "8", "--seed", "1", "--batch-size", "2")
    if kind == "fusion":
        assert code == 2 and "fusion prior" in text and str(prior_run.name) in text and not out.exists()
        return
    assert code == 0, text
    codes = np.load(out / "codes.npy")
    assert codes.shape == (3, 16, 16) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 32
    assert [p.name for p in sorted(out.glob("sample_*.png"))] == ["sample_000.png", "sample_001.png", "sample_002.png"]
    assert np.asarray(Image.open(out / "sample_000.png")).shape == (64, 64)
    assert (out / "grid.png").is_file() and not list(out.glob(".*tmp*"))
    info = json.loads((out / "samples.json").read_text())
    assert info["n"] == 3 and info["top_k"] == 8 and info["seconds_per_image"] > 0 and info["codebook_size"] == 32
    page = (out / "report.html").read_text()
    assert page.count("alt='sample ") == 3 and "code usage" in page and ">0.8<" in page
    (out / "report.html").unlink()
    assert cli("report", out)[0] == 0 and (out / "report.html").read_text() == page  # rebuilt from the saved files
    # the images are the frozen VQ-VAE's decoding of the drawn codes
    det = Detector.load(prior_run)
    decoded = det.model.vqvae.decode_codes(torch.as_tensor(codes[:1]).long()).clamp(0, 1)[0, 0].detach().numpy()
    np.testing.assert_allclose(np.asarray(Image.open(out / "sample_000.png")) / 255.0, decoded, atol=1 / 255 + 1e-6)
    again = tmp_path / "again"
    assert cli("sample", prior_run, "-n", "3", "--out", again, "--temperature", "0.8", "--top-k", "8", "--seed", "1")[0] == 0
    np.testing.assert_array_equal(np.load(again / "codes.npy"), codes)  # seeded, whatever the batch size


def test_bad_prior_inputs_get_one_line_errors(vqvae_run, tiny_phantom, tmp_path):
    code, out = cli("train", "prior", "--vqvae", tmp_path / "nowhere", "--data", tiny_phantom, "--out", tmp_path / "p1")
    assert code == 2 and "nowhere: VQ-VAE run directory not found" in out and not (tmp_path / "p1").exists()

    code, out = cli("train", "prior", "--data", tiny_phantom, "--out", tmp_path / "p2")
    assert code == 2 and "--vqvae" in out

    (tmp_path / "empty").mkdir()
    code, out = cli("train", "prior", "--vqvae", tmp_path / "empty", "--data", tiny_phantom, "--out", tmp_path / "p3")
    assert code == 2 and "no config.yaml" in out

    other = tmp_path / "other-data"
    shutil.copytree(tiny_phantom, other)
    code, out = cli("train", "prior", "--vqvae", vqvae_run, "--data", other, "--out", tmp_path / "p4")
    assert code == 2 and "same data" in out and str(tiny_phantom.resolve()) in out

    code, out = cli("train", "prior", "--vqvae", vqvae_run, "--data", tiny_phantom, "--out", tmp_path / "p5", "--image-size", "96")
    assert code == 2 and "data settings" in out

    code, out = cli("train", "prior", "--vqvae", vqvae_run, "--data", tiny_phantom, "--out", tmp_path / "p6", "--encoder", f"vit-run:{vqvae_run}")
    assert code == 2 and "not a ViT classifier run" in out

    code, out = cli("sample", vqvae_run, "-n", "1", "--out", tmp_path / "s")
    assert code == 2 and "'vqvae' run" in out


def test_benchmark_trains_the_vqvae_first_and_the_prior_on_it(tiny_phantom, tmp_path):
    vq = {
        "data": {"image_size": 64, "val_fraction": 0.2, "test_fraction": 0.3},
        "model": {"hidden_channels": 32, "residual_channels": 16, "residual_layers": 1, "embedding_dim": 16, "codebook_size": 32, "downsample_layers": 2},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "samples_per_epoch": 0, "min_images_per_epoch": 0},
    }
    prior = {**vq, "model": {"kind": "autoregressive", "embed_dim": 16, "layers": 1, "heads": 2}}
    for name, cfg in (("vqvae", vq), ("prior", prior)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    code, text = cli("benchmark", "--data", tiny_phantom, "--methods", "prior", "--out", out, "--config", f"prior={tmp_path / 'prior.yaml'}")
    assert code == 2 and "add vqvae to --methods" in text
    code, text = cli(
        "benchmark", "--data", tiny_phantom, "--methods", "prior,vqvae", "--out", out,
        "--config", f"vqvae={tmp_path / 'vqvae.yaml'}", "--config", f"prior={tmp_path / 'prior.yaml'}",
    )
    assert code == 0, text
    result = json.loads((out / "benchmark.json").read_text())
    assert result["methods"] == ["vqvae", "prior"]
    prior_run = RunDir(out / "runs" / "prior-seed0").read_config()
    assert prior_run.model.vqvae_run == str((out / "runs" / "vqvae-seed0").resolve())
    assert {"nll", "nll+alm"} <= {r["score"] for r in result["rows"] if r["method"] == "prior"}


def test_fusion_prior_on_the_patch_tokens_of_a_vit_classifier_run(vqvae_run, tiny_phantom, tmp_path):
    vit = tmp_path / "vit"
    code, text = cli(
        "train", "classifier", "--arch", "vit", "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--num-heads", "2",
        "--data", tiny_phantom, "--out", vit, *VQ_FLAGS[:6], *TRAIN_FLAGS,
    )
    assert code == 0, text
    run = tmp_path / "prior-vit"
    code, text = cli(
        "train", "prior", "--vqvae", vqvae_run, "--kind", "fusion", "--encoder", f"vit-run:{vit}", "--fusion-channels", "16",
        "--fusion-blocks", "1", "--data", tiny_phantom, "--out", run, *TRAIN_FLAGS,
    )
    assert code == 0, text
    config = RunDir(run).read_config()
    assert config.model.encoder_config.arch == "vit" and config.model.encoder_config.embed_dim == 16
    vit_weights, prior_weights = load_file(RunDir(vit).weights("best")), load_file(RunDir(run).weights("best"))
    for k, v in vit_weights.items():  # the classifier's ViT, frozen inside the prior
        assert torch.equal(prior_weights[f"encoder.vit.{k}"], v), k
    pred = Detector.load(run).predict(torch.rand(2, 1, 64, 64))
    assert pred.maps["nll"].shape == (2, 1, 64, 64) and np.isfinite(pred.scores["nll+alm"]).all()
