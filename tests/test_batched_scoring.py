"""Batched scoring with reading workers gives the results of scoring scan by scan, in input order."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medvq.cli import app
from medvq.config import DataConfig, InferenceConfig, RunConfig
from medvq.data.dataset import ScanDataset
from medvq.data.loader import prepared_batches
from medvq.data.samples import Sample
from medvq.detector import Detector, ScanMaps
from medvq.errors import ImageReadError
from medvq.io import OutputWriter
from medvq.models.registry import get_method
from medvq.models.vqvae.model import VQVAEConfig

TINY_MODEL = dict(hidden_channels=16, residual_channels=8, residual_layers=1, embedding_dim=8, codebook_size=16, downsample_layers=2)


@pytest.fixture(scope="module")
def scans(kermany) -> list[Path]:
    """Real scans of several widths, with and without white padding."""
    names = ["NORMAL/NORMAL-1256555-1.jpeg", "CNV/CNV-4483343-1.jpeg", "DRUSEN/DRUSEN-228939-1.jpeg", "CNV/CNV-1256555-1.jpeg"]
    normals = sorted((kermany / "NORMAL").glob("*.jpeg"))[:7]
    return [kermany / n for n in names] + normals


@pytest.fixture(scope="module")
def detector(scans) -> Detector:
    torch.manual_seed(0)
    config = RunConfig(method="vqvae", data=DataConfig(image_size=64), model=VQVAEConfig(**TINY_MODEL))
    det = Detector(get_method("vqvae").build_model(config.model), config, inference=InferenceConfig(batch_size=3, workers=2))
    normals = ScanDataset([Sample(path=p) for p in scans[4:]], det.preprocessor, load_masks=False)
    det.calibrate(normals, batch_size=4)
    return det


def test_batches_with_workers_match_one_scan_at_a_time(detector, scans):
    batched = detector.predict_files(scans)  # batches of 3, two reading workers
    single = detector.predict_files(scans, batch_size=1, workers=0)
    assert [r.path for r in batched] == [r.path for r in single] == scans
    for a, b in zip(batched, single):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.model_input, b.model_input)
        assert a.scores.keys() == b.scores.keys()
        for name in a.scores:
            assert a.scores[name]["score"] == pytest.approx(b.scores[name]["score"], rel=1e-4, abs=1e-5)
        assert a.decision.abnormal == b.decision.abnormal
        assert set(a.maps) == set(b.maps) == {"residual", "alm", "perceptual", "combined"}
        np.testing.assert_allclose(a.maps["combined"], b.maps["combined"], rtol=1e-4, atol=1e-4)


def test_the_scan_as_read_is_handed_over_or_read_again_when_first_asked_for(detector, scans):
    kept = detector.predict_files(scans[:4], keep_originals=True)  # from the reading workers, as overlays need
    lazy = detector.predict_files(scans[:4])
    for a, b in zip(kept, lazy):
        assert a.original is not None and b.original is None  # nothing handed over unless asked for
        np.testing.assert_array_equal(a.image, b.image)  # read again from the file: the same pixels
        assert b.original is b.image  # and read once
        assert a.scores == b.scores


def test_maps_reach_the_scan_grid_only_when_read(detector, scans):
    result = next(detector.iter_files(scans[1:2]))  # a 1024-wide scan with a padding wedge
    assert isinstance(result.maps, ScanMaps) and not result.maps._cache
    assert result.maps.model_grid["combined"].shape == (64, 64)
    full = result.maps["combined"]
    assert full.shape == result.image.shape == (496, 1024)
    assert set(result.maps._cache) == {"combined"}
    g = result.maps.geometry
    assert g.top > 100 and (full[: g.top] == 0).all(), "rows cut off as padding get no map values"


def test_unreadable_file_is_named_from_a_worker(detector, scans, tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    inputs = scans[:7] + [broken]  # the broken file lands in the third batch, read by a worker
    with pytest.raises(ImageReadError, match="broken.jpeg"):
        detector.predict_files(inputs)


def test_unreadable_files_are_skipped_and_handed_back_when_asked(detector, scans, tmp_path):
    broken = [tmp_path / "broken_a.jpeg", tmp_path / "broken_b.png"]
    for p in broken:
        p.write_bytes(b"\xff\xd8\xff\xe0 not really an image")
    inputs = scans[:2] + [broken[0]] + scans[2:5] + [broken[1]] + scans[5:7]  # bad files in the first and third batch
    skipped = []
    results = detector.predict_files(inputs, on_unreadable=lambda sample, err: skipped.append((sample.path, err.path)))
    good = [p for p in inputs if p not in broken]
    assert [r.path for r in results] == good
    assert skipped == [(broken[0], broken[0]), (broken[1], broken[1])]
    alone = {r.path: r.scores["combined"]["score"] for r in detector.predict_files(good)}
    assert all(r.scores["combined"]["score"] == pytest.approx(alone[r.path], rel=1e-4, abs=1e-5) for r in results)
    # a dataset (evaluation's reading) leaves them out the same way, each scan keeping its own pixels and geometry
    skipped.clear()
    data = ScanDataset([Sample(path=p) for p in inputs], detector.preprocessor, load_masks=False, workers=2, on_unreadable=lambda s, e: skipped.append(s.path))
    clean = ScanDataset([Sample(path=p) for p in good], detector.preprocessor, load_masks=False)
    assert skipped == broken and [s.path for s in data.samples] == good
    assert torch.equal(data.images, clean.images) and torch.equal(data.valid, clean.valid) and data.geometry == clean.geometry


def test_scan_dataset_read_by_workers_equals_read_in_process(detector, scans):
    samples = [Sample(path=p) for p in scans]
    a = ScanDataset(samples, detector.preprocessor, load_masks=False, workers=2)
    b = ScanDataset(samples, detector.preprocessor, load_masks=False, workers=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.valid, b.valid) and a.geometry == b.geometry


def test_loader_keeps_order_and_masks(tiny_phantom):
    from medvq.data.preprocess import Preprocessor

    images = sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:5]
    samples = [Sample(path=p, mask_path=tiny_phantom / "masks" / "test" / "CNV" / f"{p.stem}.png") for p in images]
    assert len(samples) == 5 and all(s.mask_path.is_file() for s in samples)
    batches = list(prepared_batches(samples, Preprocessor(image_size=32), batch_size=2, workers=2, with_masks=True))
    assert [b.start for b in batches] == [0, 2, 4]
    assert [s.path for b in batches for s in b.samples] == images
    assert all(b.masks is not None and b.masks.shape == (len(b.samples), 1, 32, 32) for b in batches)
    assert any(b.masks.any() for b in batches), "CNV scans carry lesions"
    with pytest.raises(ValueError, match="batch_size"):
        next(prepared_batches(samples, Preprocessor(), batch_size=0))


def test_output_writer_raises_a_failed_write():
    def fail(_):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with OutputWriter(threads=1) as writer:
            writer.submit(fail, 1)
    written = []
    with OutputWriter(threads=2, max_pending=2) as writer:
        for i in range(10):
            writer.submit(written.append, i)
    assert sorted(written) == list(range(10))


def test_bad_speed_option_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["infer", str(tmp_path / "run"), str(tmp_path), "--out", str(tmp_path / "o"), "--precision", "fp8"])
    assert result.exit_code == 2
    assert "precision" in result.output and "Traceback" not in result.output


def test_reading_workers_leave_their_cores_to_the_scoring_threads(monkeypatch):
    import torch

    from medvq.data import loader

    monkeypatch.setattr(loader, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        share = loader.ThreadShare(2)
        assert share.choose(waited=0.3, worked=0.0) == torch.get_num_threads() == 1  # the first batch: workers busy
        assert share.choose(waited=0.0, worked=1.0) == torch.get_num_threads() == 2  # batches ready: all threads
        assert share.choose(waited=0.5, worked=1.0) == torch.get_num_threads() == 1  # waiting for the workers again
        share.restore()
        assert torch.get_num_threads() == 2
        assert loader.ThreadShare(0).choose(waited=1.0, worked=0.0) == 2  # no workers: nothing to share
    finally:
        torch.set_num_threads(before)
