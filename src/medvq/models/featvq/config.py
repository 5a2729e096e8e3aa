"""Settings of feature-space VQ, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medvq.models.backbones.config import PatchFeatureConfig


class FeatVQConfig(PatchFeatureConfig):
    """Backbone features (``PatchFeatureConfig``, as PatchCore's), codebook and code-prior settings; stored with every run."""

    codebook_size: int = Field(
        2048,
        ge=2,
        description="Codes K in the feature codebook (a memory bank of fixed size). 2048 separated validation patients as well as 8192 "
        "(benchmarks/featvq_codebook.py; docs/results.md) at a quarter of the search.",
    )
    ema_decay: float = Field(0.99, gt=0, lt=1, description="Decay of the codebook's EMA updates.")
    kmeans_init: bool = Field(
        True,
        description="Initialise the codebook by k-means on a uniform sample of the training scans' patch features (one pass before "
        "the first epoch); false: the first training batch's features, as the VQ autoencoders do.",
    )
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations of that initialisation.")
    kmeans_seeding: Literal["random", "kmeans++", "farthest"] = Field(
        "farthest",
        description="Where k-means starts: distinct random samples, k-means++ (drawn by squared distance) or the farthest-point "
        "(k-center) order that gives every outlier a code; compared on validation patients in benchmarks/featvq_codebook.py.",
    )
    kmeans_sample_patches: int = Field(
        131072,
        ge=1,
        description="Patch features sampled (uniformly over all training scans and positions) for the k-means initialisation; "
        "bounds its memory (64 dims x 4 bytes each) whatever the number of training scans.",
    )
    codebook_refit: bool = Field(
        True,
        description="When the training scans hold more patch features than the k-means sample, one more pass over every training "
        "scan after k-means moves each code to the mean of the training patch features nearest it (a last Lloyd step on all the "
        "data, not only the sample). Lifted the pixel AUROC on 1,000 phantom scans at 8192 codes (docs/results.md); a sample "
        "that already holds every patch skips it.",
    )
    dead_code_threshold: float = Field(
        1.0, ge=0, description="A code whose EMA usage falls below this is restarted on a random patch feature of the batch (0: never)."
    )
    codebook_epochs: int = Field(
        0,
        ge=0,
        description="Epochs in which the codebook keeps learning by EMA updates and dead-code restarts after its initialisation; afterwards "
        "it is frozen and only the prior trains on fixed codes (0: keep the k-means codebook, chosen on validation patients).",
    )
    prior_context: Literal["bidirectional", "causal"] = Field(
        "bidirectional",
        description="What the code prior predicts each position from: every other position (bidirectional) or the positions before it "
        "in raster order (causal, as the VQ-VAE's autoregressive prior).",
    )
    prior_vocabulary: int = Field(
        512,
        ge=0,
        description="Code groups the prior reads and predicts: after the codebook's initialisation its K codes are grouped by k-means of "
        "their vectors into this many groups, and the nll map is -log p(group of the code | the groups around it). A few hundred "
        "groups can be learnt from a few dozen scans, K = 8192 codes cannot, and the prior's output layer is K / groups times "
        "smaller. 0 or >= K: every code its own group.",
    )
    prior_layers: int = Field(2, ge=1, description="Attention layers of the code prior.")
    prior_dim: int = Field(64, ge=8, description="Width of the code prior's tokens.")
    prior_heads: int = Field(4, ge=1, description="Attention heads per layer of the code prior.")
    prior_mask_ratio: float = Field(
        0.15, ge=0, lt=1, description="Masked-code training: share of the context codes hidden at random from every prediction in a training step."
    )
    prior_train_queries: int = Field(
        256,
        ge=0,
        description="Positions per image whose codes the prior learns to predict in a training step, drawn at random (0: all); "
        "every position still serves as context. Fewer queries make a step several times cheaper with the same model.",
    )
    prior_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the code prior while training.")
