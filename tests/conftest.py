from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERMANY = Path(os.environ.get("MEDVQ_KERMANY_DEV", REPO.parent / "shared" / "data" / "kermany-dev"))


@pytest.fixture(scope="session")
def kermany() -> Path:
    assert KERMANY.is_dir(), f"real OCT test data not found at {KERMANY} (set MEDVQ_KERMANY_DEV)"
    return KERMANY


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A small phantom dataset (OCT2017 layout + masks), shared by the end-to-end tests."""
    from medvq.data.phantom import PhantomConfig, write_phantom

    root = tmp_path_factory.mktemp("phantom")
    return write_phantom(root, 160, seed=3, config=PhantomConfig(height=128, width=128))
