"""medvq benchmark: two methods on one tiny phantom split, one table; stage meters; aggregation over seeds."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medvq.cli import app
from medvq.errors import MedvqError
from medvq.evaluation.benchmark import StageMeter, aggregate, check_same_test_set, markdown_table, parse_methods, parse_seeds

runner = CliRunner()

SPLIT = {"image_size": 64, "val_fraction": 0.2, "test_fraction": 0.3}
VQVAE = {
    "data": SPLIT,
    "model": {"hidden_channels": 32, "residual_channels": 16, "residual_layers": 1, "embedding_dim": 16, "codebook_size": 32, "downsample_layers": 2},
    "train": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "device": "cpu", "samples_per_epoch": 2, "min_images_per_epoch": 0},
}
PATCHCORE = {"data": SPLIT, "model": {"feature_stages": [2, 3], "coreset_ratio": 0.2}, "train": {"device": "cpu"}}


@pytest.fixture(scope="module")
def bench(tiny_phantom, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    for name, cfg in (("vqvae", VQVAE), ("patchcore", PATCHCORE)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "out"
    args = ["benchmark", "--data", str(tiny_phantom), "--methods", "vqvae,patchcore", "--out", str(out), "--image-size", "64",
            "--config", f"vqvae={root / 'vqvae.yaml'}", "--config", f"patchcore={root / 'patchcore.yaml'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_benchmark_writes_one_table_for_every_method_and_score(bench):
    for name in ("benchmark.md", "benchmark.csv", "benchmark.json", "benchmark.html"):
        assert (bench / name).is_file(), name
    result = json.loads((bench / "benchmark.json").read_text())
    assert [(r["method"], r["score"]) for r in result["rows"]] == [
        ("vqvae", "residual"), ("vqvae", "alm"), ("vqvae", "perceptual"), ("vqvae", "combined"), ("patchcore", "patch_distance"), ("patchcore", "reweighted_max")
    ]
    assert len({(r["test_images"], r["test_fingerprint"]) for r in result["runs"]}) == 1
    assert result["test_counts"] == {"CNV": 7, "DME": 6, "DRUSEN": 6, "NORMAL": 15}
    for run in result["runs"]:  # the table is made of the runs' own metrics.json files
        metrics = json.loads((Path(run["run"]) / "eval" / "metrics.json").read_text())
        for row in (r for r in result["rows"] if r["method"] == run["method"]):
            assert row["image_auroc"]["mean"] == metrics["maps"][row["score"]]["image_auroc"]
            assert row["image_auroc_per_class"]["DRUSEN"]["mean"] == metrics["maps"][row["score"]]["image_auroc_per_class"]["DRUSEN"]
        assert not run["supervised"]
        split = json.loads((Path(run["run"]) / "split.json").read_text())
        assert {x["label"] for x in split["splits"]["train"]} == {"NORMAL"}
    rows = {(r["method"], r["score"]): r for r in result["rows"]}
    assert 0 <= rows["patchcore", "patch_distance"]["pixel_auroc"]["mean"] <= 1
    assert rows["patchcore", "reweighted_max"]["pixel_auroc"] is None, "an image score has no pixel metrics"
    assert rows["patchcore", "patch_distance"]["image_auroc"]["mean"] > 0.6, "the memory bank ranks phantom lesions above normals"


@pytest.mark.slow
def test_benchmark_measures_time_memory_and_load(bench):
    result = json.loads((bench / "benchmark.json").read_text())
    for run in result["runs"]:
        assert run["train"]["seconds"] > 0 and run["inference"]["images_per_second"] > 0
        assert run["inference"]["images"] == result["test_images"]
        assert run["train"]["peak_rss_mb"] >= run["train"]["rss_before_mb"] > 50
        assert run["train"]["peak_is_this_stage"] is sys.platform.startswith("linux")
        assert run["train"]["load_1min_before"] >= 0
    pc = next(r for r in result["runs"] if r["method"] == "patchcore")
    assert pc["fit"]["memory_bank"] == round(0.2 * pc["fit"]["patches"]) and pc["fit"]["patch_grid"] == [16, 16]
    table = (bench / "benchmark.md").read_text()
    header = table.splitlines()[0]
    for col in ("image AUROC", "AUROC CNV", "AUROC DRUSEN", "AUPRC", "pixel AUROC", "AUPRO", "Dice", "train s", "infer img/s", "train peak MB"):
        assert col in header, col
    assert table.count("normal scans only") == 6 and "load average" in table
    rows = list(csv.DictReader(open(bench / "benchmark.csv")))
    assert len(rows) == 6 and float(rows[0]["image AUROC mean"]) == pytest.approx(result["rows"][0]["image_auroc"]["mean"], rel=1e-5)
    page = (bench / "benchmark.html").read_text()
    assert page.count("<tr>") >= 8 and "data:image/png;base64" in page
    assert "runs/patchcore-seed0/eval/report.html" in page and (bench / "runs/patchcore-seed0/eval/report.html").is_file()


@pytest.mark.slow
def test_patchcore_run_works_with_infer(bench, tiny_phantom, tmp_path):
    scans = sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:2]
    out = tmp_path / "infer"
    result = runner.invoke(app, ["infer", str(bench / "runs" / "patchcore-seed0"), *map(str, scans), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 2 and {"patch_distance", "reweighted_max", "reweighted_max_z", "reweighted_max_normal_percentile"} <= set(rows[0])
    assert np.load(out / "maps" / f"{rows[0]['name']}_patch_distance.npy").shape == (128, 128)


@pytest.mark.slow
def test_benchmark_reuses_finished_runs_and_refuses_to_clobber(bench, tiny_phantom, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bench, copy)
    weights = copy / "runs" / "patchcore-seed0" / "model" / "best.safetensors"
    before = weights.stat().st_mtime_ns
    cfg = json.loads((copy / "runs" / "patchcore-seed0" / "benchmark_run.json").read_text())["requested_config"]
    (tmp_path / "pc.yaml").write_text(yaml.safe_dump({k: cfg[k] for k in ("data", "model", "train")}))
    vq = json.loads((copy / "runs" / "vqvae-seed0" / "benchmark_run.json").read_text())["requested_config"]
    (tmp_path / "vq.yaml").write_text(yaml.safe_dump({k: vq[k] for k in ("data", "model", "train")}))
    args = ["benchmark", "--data", str(tiny_phantom), "--methods", "vqvae,patchcore", "--out", str(copy), "--image-size", "64",
            "--config", f"vqvae={tmp_path / 'vq.yaml'}", "--config", f"patchcore={tmp_path / 'pc.yaml'}"]
    result = runner.invoke(app, [*args, "--reuse"])
    assert result.exit_code == 0, result.output
    assert result.output.count("reusing") == 2 and weights.stat().st_mtime_ns == before
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not empty" in result.output and "--reuse" in result.output


def test_bad_benchmark_arguments_are_one_line_errors(tiny_phantom, tmp_path):
    result = runner.invoke(app, ["benchmark", "--data", str(tiny_phantom), "--methods", "vqvae,patchcor", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "patchcor" in result.output and "patchcore" in result.output
    result = runner.invoke(app, ["benchmark", "--data", str(tiny_phantom), "--out", str(tmp_path / "o"), "--config", "vqvae.yaml"])
    assert result.exit_code == 2 and "METHOD=FILE.yaml" in result.output
    result = runner.invoke(app, ["benchmark", "--data", str(tiny_phantom), "--out", str(tmp_path / "o"), "--seed", "0,x"])
    assert result.exit_code == 2 and "--seed" in result.output
    assert parse_methods("all")[:2] == ["vqvae", "vqvae2"] and "patchcore" in parse_methods("all")
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_stage_meter_sees_the_stage_peak():
    with StageMeter() as first:
        block = np.ones(40_000_000)  # 320 MB, freed before the next stage
        del block
    with StageMeter() as second:
        small = np.ones(1_000_000)
        del small
    assert first.result["peak_increase_mb"] > 250 and first.result["seconds"] > 0
    if sys.platform.startswith("linux"):
        assert second.result["peak_increase_mb"] < 100, "the peak of an earlier stage does not count"


def _record(method: str, seed: int, auroc: float, fingerprint: str = "abc", supervised: bool = False) -> dict:
    stage = {"seconds": 10.0 + seed, "peak_rss_mb": 500.0, "rss_before_mb": 400.0, "load_1min_before": 1.0, "load_1min_after": 2.0}
    return {
        "method": method, "seed": seed, "supervised": supervised, "image_size": 64, "train_images": 10, "test_images": 5,
        "test_fingerprint": fingerprint, "train": stage, "inference": {**stage, "images_per_second": 50.0 + seed},
        "maps": {"s": {"image_auroc": auroc, "image_auprc": auroc, "image_auroc_per_class": {"CNV": auroc}, "image_auroc_by_width": {"512": auroc}}},
    }


def test_seeds_aggregate_to_mean_and_std_and_supervised_is_marked():
    rows = aggregate([_record("a", 0, 0.8), _record("a", 1, 0.9), _record("b", 0, 0.7, supervised=True)])
    a, b = rows
    assert a["image_auroc"]["mean"] == pytest.approx(0.85) and a["image_auroc"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert a["image_auroc_by_width"]["512"]["n"] == 2 and a["train_seconds"]["mean"] == pytest.approx(10.5)
    assert b["image_auroc"] == {"mean": 0.7, "std": 0.0, "n": 1} and a["pixel_auroc"] is None
    table = markdown_table({"rows": rows})
    assert "0.850 ± 0.071" in table and "AUROC 512px-wide" in table and "supervised (labelled training patients)" in table


def test_runs_on_different_test_images_are_refused():
    check_same_test_set([_record("a", 0, 0.8), _record("b", 0, 0.8)])
    with pytest.raises(MedvqError, match="different test images"):
        check_same_test_set([_record("a", 0, 0.8), _record("b", 0, 0.8, fingerprint="other")])
