"""Learning-rate schedule shared by every trained method."""

from __future__ import annotations

import csv

import pytest

from medvq.config import build_config
from medvq.engine.optim import COSINE_FLOOR, WARMUP_STEPS, lr_factor
from medvq.engine.train import train_run


def test_constant_schedule_is_warmup_then_flat():
    assert lr_factor(0, 1000) == pytest.approx(1 / WARMUP_STEPS)
    assert lr_factor(WARMUP_STEPS // 2 - 1, 1000) == pytest.approx(0.5)
    assert [lr_factor(s, 1000) for s in (WARMUP_STEPS - 1, 500, 5000)] == [1.0, 1.0, 1.0]


def test_cosine_schedule_decays_to_the_floor_at_the_last_step():
    total = 1100
    factors = [lr_factor(s, total, "cosine") for s in range(total + 50)]
    assert factors[WARMUP_STEPS - 1] == pytest.approx(1.0)
    assert factors[WARMUP_STEPS - 1 + 500] == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5)  # half way
    assert factors[total - 1] == pytest.approx(COSINE_FLOOR)
    after_warmup = factors[WARMUP_STEPS - 1 :]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:])), "never rises after the warm-up"
    assert min(factors) >= COSINE_FLOOR / WARMUP_STEPS and factors[-1] == pytest.approx(COSINE_FLOOR)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear"):
        lr_factor(200, 1000, "linear")
    with pytest.raises(Exception, match="lr_schedule"):
        build_config({"train": {"lr_schedule": "linear"}})


@pytest.mark.slow
def test_cosine_training_ends_at_a_lower_learning_rate(tiny_phantom, tmp_path):
    config = build_config(
        {
            "data": {"image_size": 64, "val_fraction": 0.2, "test_fraction": 0.3},
            "model": {"hidden_channels": 16, "residual_channels": 8, "residual_layers": 1, "embedding_dim": 8, "codebook_size": 16, "downsample_layers": 2},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 2e-3, "lr_schedule": "cosine", "device": "cpu", "min_images_per_epoch": 0, "samples_per_epoch": 0},
        }
    )
    run = tmp_path / "run"
    train_run(config, tiny_phantom, run, progress=False)
    rates = [float(r["lr"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert len(rates) == 2 and rates[-1] < rates[0] <= 2e-3
    assert (run / "config.yaml").read_text().count("lr_schedule: cosine") == 1
