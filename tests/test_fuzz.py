"""Hostile inputs to every command, run in-process: each ends in one clear line naming the file (exit 2) or
in a correct result; never a traceback, and inputs and earlier results stay byte for byte as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from medvq.cli import app

runner = CliRunner()

TINY = [
    "--image-size", "32", "--val-fraction", "0.2", "--test-fraction", "0.3",
    "--hidden-channels", "16", "--residual-channels", "8", "--residual-layers", "1", "--embedding-dim", "8",
    "--codebook-size", "16", "--downsample-layers", "2",
    "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--samples-per-epoch", "2", "--min-images-per-epoch", "0",
    "--precision", "32",
]


def cli(*args) -> tuple[int, str]:
    """Exit code and stderr+stdout of one command; a traceback anywhere fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output
    assert "Traceback" not in text and not isinstance(result.exception, (AssertionError, NameError, TypeError, AttributeError)), text
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {text}")
    return result.exit_code, text


def one_error(code: int, text: str, *names) -> str:
    """The command failed with exit 2 and one 'error:' line naming each of ``names``."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, text
    assert len(errors) == 1, text
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files that exist), to show nothing changed."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medvq.data.phantom import PhantomConfig, write_phantom

    return write_phantom(tmp_path_factory.mktemp("fuzz") / "phantom", 48, seed=5, config=PhantomConfig(height=64, width=64))


@pytest.fixture(scope="module")
def run(data) -> Path:
    out = data.parent / "run"
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *TINY)
    assert code == 0, text
    return out


@pytest.fixture()
def scans(data, tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in sorted((data / "test").rglob("*.jpeg"))[:4]:
        shutil.copy(p, folder / p.name)
    return folder


def copy_run(run: Path, tmp_path: Path) -> Path:
    other = tmp_path / "run-copy"
    shutil.copytree(run, other)
    return other


# --- data loss ---------------------------------------------------------------------------------
def test_infer_never_reads_its_own_outputs_back(run, scans):
    before = digest(scans)
    for _ in range(2):
        code, text = cli("infer", run, scans, "--out", scans / "results")
        assert code == 0, text
        assert "4 scans scored" in text
    code, text = cli("infer", run, scans, "--out", scans)  # --out is the input folder itself
    assert code == 0 and "4 scans scored" in text, text
    code, text = cli("infer", run, scans, "--out", scans)
    assert code == 0 and "4 scans scored" in text, text
    assert all(digest(scans)[k] == v for k, v in before.items()), "input scans unchanged"


def test_saturated_scan_is_skipped_and_counted(run, scans, tmp_path):
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(scans / "white.png")
    code, text = cli("infer", run, scans, "--out", tmp_path / "out")
    assert code == 0, text
    assert "white.png" in text and "1 scan(s) without any valid pixel skipped" in text
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 1 + 4


def test_training_skips_a_saturated_validation_normal(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(copy / "val" / "NORMAL" / "NORMAL-999-1.jpeg")
    code, text = cli("train", "vqvae", "--data", copy, "--out", tmp_path / "r", *TINY)
    assert code == 0, text
    assert "skipped 1 validation scan(s) without any valid pixel" in text
    assert (tmp_path / "r" / "calibration.json").is_file()


def test_demo_never_deletes_what_it_did_not_write(tmp_path):
    data = tmp_path / "demo" / "data"
    (data / "train" / "NORMAL").mkdir(parents=True)
    (data / "notes.txt").write_text("mine")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "train" / "NORMAL" / "NORMAL-1-1.jpeg")
    before = digest(tmp_path)
    code, text = cli("demo", "--out", tmp_path / "demo", "-n", "8", "--epochs", "1")
    one_error(code, text, data)
    assert digest(tmp_path) == before


def test_overwrite_interrupted_keeps_the_old_run_and_resume_finishes_it(run, data, tmp_path, monkeypatch):
    from medvq.models.vqvae.lightning import VQVAEModule

    old = copy_run(run, tmp_path)
    before = digest(old)
    original = VQVAEModule.training_step

    def ctrl_c_in_second_epoch(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(VQVAEModule, "training_step", ctrl_c_in_second_epoch)
    flags = [f for f in TINY]
    flags[flags.index("--epochs") + 1] = "2"
    code, text = cli("train", "vqvae", "--data", data, "--out", old, "--overwrite", *flags, "--codebook-size", "8")
    assert code == 130, text
    assert "interrupted after epoch 1; --resume continues" in text
    assert digest(old) == before, "the run being replaced is untouched until the new one is complete"
    monkeypatch.setattr(VQVAEModule, "training_step", original)
    code, text = cli("train", "vqvae", "--data", data, "--out", old, "--resume")
    assert code == 0, text
    assert yaml.safe_load((old / "config.yaml").read_text())["model"]["codebook_size"] == 8
    assert [line.split(",")[0] for line in (old / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert not (tmp_path / ".run-copy.partial").exists()


def test_resume_checks_data_and_checkpoint_before_writing(run, data, tmp_path):
    other_data = tmp_path / "other"
    shutil.copytree(data, other_data)
    for p in sorted((other_data / "train" / "NORMAL").glob("*.jpeg"))[:2]:
        p.unlink()
    copy = copy_run(run, tmp_path)
    before = digest(copy)
    code, text = cli("train", "vqvae", "--data", other_data, "--out", copy, "--resume", "--epochs", "2")
    one_error(code, text, other_data, str(data))
    assert digest(copy) == before
    ckpt = copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = digest(copy)
    code, text = cli("train", "vqvae", "--data", data, "--out", copy, "--resume", "--epochs", "2")
    one_error(code, text, ckpt)
    assert digest(copy) == before


def test_a_run_stopped_before_its_first_epoch_starts_again(run, data, tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(run / "config.yaml", stopped / "config.yaml")
    shutil.copy(run / "split.json", stopped / "split.json")
    code, text = cli("train", "vqvae", "--data", data, "--out", stopped, "--resume")
    assert "start it again without --resume" in one_error(code, text, stopped)
    code, text = cli("train", "vqvae", "--data", data, "--out", stopped, *TINY)
    assert code == 0, text
    assert (stopped / "calibration.json").is_file()
