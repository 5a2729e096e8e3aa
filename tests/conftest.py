from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERMANY = Path(os.environ.get("MEDVQ_KERMANY_DEV", REPO.parent / "shared" / "data" / "kermany-dev"))
COLIN27 = Path(os.environ.get("MEDVQ_COLIN27", "/usr/share/mricron/templates/ch2.nii.gz"))


@pytest.fixture(scope="session")
def kermany() -> Path:
    assert KERMANY.is_dir(), f"real OCT test data not found at {KERMANY} (set MEDVQ_KERMANY_DEV)"
    return KERMANY


@pytest.fixture(scope="session")
def colin27() -> Path:
    """The Colin27 T1 brain volume (181x217x181, 1 mm) of Debian's mricron-data, installed by `scripts/setup.sh --test`."""
    assert COLIN27.is_file(), f"Colin27 T1 volume not found at {COLIN27} (run `bash scripts/setup.sh --test`, or set MEDVQ_COLIN27)"
    return COLIN27


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    """Small real NIfTI files shipped with nibabel: anatomical.nii, example4d.nii.gz, functional.nii, example_nifti2.nii.gz."""
    from nibabel.testing import data_path

    return Path(data_path)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A small phantom dataset (OCT2017 layout + masks), shared by the end-to-end tests."""
    from medvq.data.phantom import PhantomConfig, write_phantom

    root = tmp_path_factory.mktemp("phantom")
    return write_phantom(root, 160, seed=3, config=PhantomConfig(height=128, width=128))


@pytest.fixture
def no_unpickling(monkeypatch) -> None:
    """Within the test, anything that unpickles fails it: weights load from safetensors, settings from YAML and JSON."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a model")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
