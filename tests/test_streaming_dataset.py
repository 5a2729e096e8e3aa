"""Streaming training scans: the same items as the in-memory dataset, nothing held between reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvq.config import DataConfig
from medvq.data.dataset import ScanDataset, StreamingScanDataset
from medvq.data.preprocess import Preprocessor
from medvq.data.samples import Sample
from medvq.errors import DatasetError


def _samples(kermany: Path) -> list[Sample]:
    files = sorted((kermany / "NORMAL").glob("*.jpeg"))[:3] + sorted((kermany / "DME").glob("*.jpeg"))[:2]
    return [Sample(path=f, label=f.parent.name) for f in files]


def test_streaming_gives_the_in_memory_items_and_batches(kermany):
    pre = Preprocessor.from_config(DataConfig(image_size=64))
    samples = _samples(kermany)
    stored, streamed = ScanDataset(samples, pre, targets=[0, 0, 0, 1, 1]), StreamingScanDataset(samples, pre, targets=[0, 0, 0, 1, 1])
    assert streamed.images is None and len(streamed) == len(stored) == 5
    for i in range(5):
        a, b = stored[i], streamed[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    x, y = stored.batch([4, 0, 2]), streamed.batch([4, 0, 2])
    assert torch.equal(x.image, y.image) and torch.equal(x.valid, y.valid) and torch.equal(x.target, y.target)
    assert [s.path for s in y.samples] == [samples[i].path for i in (4, 0, 2)]
    sub = streamed.subset([3, 1])
    assert torch.equal(sub.batch([0, 1]).image, stored.batch([3, 1]).image) and sub.targets.tolist() == [1, 0]
    assert sum(b.image.shape[0] for b in streamed.batches(2)) == 5
    for a, b in zip(stored.batches(2), streamed.batches(2)):  # the streamed batches trim the heap between them
        assert torch.equal(a.image, b.image) and torch.equal(a.valid, b.valid)


def test_streaming_names_a_missing_scan(kermany, tmp_path):
    pre = Preprocessor.from_config(DataConfig(image_size=64))
    with pytest.raises(DatasetError, match="gone.jpeg: scan not found"):
        StreamingScanDataset([*_samples(kermany), Sample(path=tmp_path / "gone.jpeg")], pre)
