"""The contract every registered method keeps, end to end on a tiny phantom: train one epoch (or fit) ->
the run folder rebuilds the same model (the same scores as the model training left in memory) ->
evaluate -> the report rebuilt from the saved files alone is the same page.

A new method joins this test by being registered; it only needs its smallest settings in ``TINY_MODELS``.
What a declaration claims (``explains``, ``sampling``, ``metrics``, its maps, the run it stands on) is
exercised here too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from rich.console import Console

from medvq.config import build_config
from medvq.data.dataset import ScanDataset
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.engine.train import train_run
from medvq.evaluation.evaluate import evaluate_run, select_test_samples
from medvq.explain import explain
from medvq.models.registry import get_method, method_names
from medvq.report.html import build_report
from medvq.sampling import sample_run

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
# The smallest settings of each method that still run its whole path (stride divides 32, a few codes, one block).
TINY_MODELS: dict[str, dict] = {
    "vqvae": {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 1, "embedding_dim": 4, "codebook_size": 8, "downsample_layers": 2},
    "vqvae2": {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 1, "embedding_dim": 4, "codebook_size_top": 8, "codebook_size_bottom": 8},
    "classifier": {"arch": "vit", "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    "patchcore": {"feature_stages": [2, 3]},
    "featvq": {"feature_stages": [2, 3], "codebook_size": 16, "codebook_epochs": 1, "prior_layers": 1, "prior_dim": 8, "prior_heads": 2, "prior_train_queries": 0},
    "prior": {"kind": "autoregressive", "embed_dim": 8, "layers": 1, "heads": 2},
}
TINY_TRAIN = {"epochs": 1, "batch_size": 8, "min_images_per_epoch": 0, "samples_per_epoch": 0, "device": "cpu", "precision": "32"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medvq.data.phantom import PhantomConfig, write_phantom

    # two classes keep the report's per-class figures few (its cost, not the models', dominates this test)
    root = tmp_path_factory.mktemp("contract") / "data"
    return write_phantom(root, 48, seed=5, config=PhantomConfig(height=64, width=64), class_fractions={"NORMAL": 0.6, "CNV": 0.4})


def _config(method: str, extra_model: dict | None = None):
    return build_config(
        {"method": method, "data": {"image_size": IMAGE_SIZE}, "model": {**TINY_MODELS[method], **(extra_model or {})}, "train": TINY_TRAIN},
        source=f"contract test of {method}",
    )


@dataclass
class Trained:
    run: Path
    model: torch.nn.Module  # the model as training held it when it wrote model/best.safetensors
    config: object  # the config training wrote to config.yaml


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory) -> Callable[[str], Trained]:
    """``trained(method)``: a tiny run of ``method``, trained once for the module (a prior's VQ-VAE run is the
    vqvae test's run)."""
    runs: dict[str, Trained] = {}

    def train(method: str) -> Trained:
        if method not in runs:
            extra = {dep.field: str(train(dep.method).run) for dep in get_method(method).depends_on}
            out = tmp_path_factory.mktemp(method) / "run"
            held: dict = {}
            save_weights, write_config = RunDir.save_weights, RunDir.write_config

            def keep_weights(self, model, which):
                if which == "best":
                    held["model"] = copy.deepcopy(model).cpu()
                save_weights(self, model, which)

            def keep_config(self, cfg):
                held["config"] = cfg
                write_config(self, cfg)

            with pytest.MonkeyPatch.context() as m:
                m.setattr(RunDir, "save_weights", keep_weights)
                m.setattr(RunDir, "write_config", keep_config)
                train_run(_config(method, extra), phantom, out, progress=False, console=Console(quiet=True))
            runs[method] = Trained(out, held["model"], held["config"])
        return runs[method]

    return train


def test_every_registered_method_has_tiny_settings():
    assert sorted(TINY_MODELS) == sorted(method_names()), "add the smallest settings of a new method to TINY_MODELS"


@pytest.mark.parametrize("method", method_names())
def test_train_load_score_evaluate_report(method, phantom, trained, tmp_path):
    declared = get_method(method)
    run_dir, model, config = trained(method).run, trained(method).model, trained(method).config

    # The run folder alone rebuilds the config and the model training held in memory.
    run = RunDir(run_dir)
    assert run.read_config() == config
    loaded = Detector.load(run_dir)
    in_memory = Detector(model, config, loaded.calibration)
    test = ScanDataset(select_test_samples(run, phantom).samples[:8], loaded.preprocessor, load_masks=False)
    a, b = loaded.predict(test.images, test.valid), in_memory.predict(test.images, test.valid)
    assert set(a.scores) == set(b.scores) and set(a.maps) >= set(declared.maps(config.model))
    for name in a.scores:
        np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.isfinite(a.scores[name]).all(), name

    # Evaluate writes every declared map's metrics; the report is rebuilt from the saved files alone.
    out = tmp_path / "eval"
    result = evaluate_run(run_dir, phantom, out, gallery_per_class=1, reconstruction_gallery=2, progress=False, console=Console(quiet=True))
    assert set(declared.maps(config.model)) <= set(result["maps"])
    for family in declared.metrics:
        assert family in result, family
    page = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert build_report(out) == out / "report.html" and (out / "report.html").read_text() == page

    # What the declaration says it can do, it does.
    scans = [s.path for s in select_test_samples(run, phantom).samples[:2]]
    if declared.explains:
        rows = explain(run_dir, scans, tmp_path / "explain", console=Console(quiet=True))
        assert len(rows) == 2 and all(0 <= r["p_abnormal"] <= 1 for r in rows)
    if declared.sampling is not None and declared.sampling(config.model) is None:
        drawn = sample_run(run_dir, 2, tmp_path / "samples", progress=False, console=Console(quiet=True))
        assert drawn["n"] == 2 and (tmp_path / "samples" / "sample_001.png").is_file()
