"""Multi-process data-parallel training (DDP over gloo on the CPU), as a user would start it."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_process_ddp_training(tiny_phantom, tmp_path):
    medvq = Path(sys.executable).parent / "medvq"
    run = tmp_path / "ddp"
    cmd = [str(medvq), "train", "vqvae", "--data", str(tiny_phantom), "--out", str(run), "--device", "cpu", "--devices", "2",
           "--strategy", "ddp", "--epochs", "2", "--image-size", "64", "--hidden-channels", "32", "--residual-channels", "16",
           "--codebook-size", "32", "--downsample-layers", "2", "--min-images-per-epoch", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("medvq training vqvae") == 1, "only the first process reports"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (run / "model" / "best.safetensors").is_file() and (run / "calibration.json").is_file()
