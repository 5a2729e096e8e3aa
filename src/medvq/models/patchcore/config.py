"""Settings of a PatchCore memory bank, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

from pydantic import Field

from medvq.models.backbones.config import PatchFeatureConfig

class PatchCoreConfig(PatchFeatureConfig):
    """Backbone features, local aggregation (``PatchFeatureConfig``) and memory-bank settings; stored with every run."""

    coreset_ratio: float = Field(0.1, gt=0, le=1, description="Share of the training patches kept in the memory bank (greedy k-center coreset).")
    coreset_projection_dim: int = Field(
        128, ge=0, description="Coreset selection runs on a seeded Gaussian random projection to this many dimensions (0: on the features themselves)."
    )
    coreset_chunk_patches: int = Field(
        16384,
        ge=256,
        description="Patches per coreset chunk: training patches are streamed in chunks of this size and each chunk is subsampled on its own, "
        "so memory and time grow linearly with the number of training images.",
    )
    reweight_neighbours: int = Field(
        9, ge=1, description="Image score: bank neighbours of the nearest entry used to re-weight the largest patch distance (1: plain maximum)."
    )
