"""The vector quantizer shared by every VQ model.

A thin wrapper over ``vector_quantize_pytorch.VectorQuantize`` (EMA codebook updates, k-means
initialisation, dead-code restarts, DDP-synchronised statistics) that fixes what our models rely on:
channel-first image maps, distances and codebook updates in fp32 whatever the autocast context, and one
output type carrying the pre-quantisation latents needed by the alignment loss map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import VectorQuantize

# Distances per block of a nearest-neighbour search (codebook or memory bank; 64 MB of fp32). Smaller blocks were faster on one thread
# (1 MB: 1.2-1.7x) but ten times slower on two, where each small matrix product pays the threads' start and
# join (a 32-scan featvq batch, 32,768 patches x 2,048 codes: 5.1 s against 0.5 s).
NEAREST_BLOCK_ELEMENTS = 2**24


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w) codebook vectors, straight-through gradient to the encoder
    indices: torch.Tensor  # (B, h, w) int64 code index per latent position
    loss: torch.Tensor  # scalar: beta * ||z_e - sg[e]||^2 (the codebook itself follows EMA updates)
    latents: torch.Tensor  # (B, D, h, w) encoder output z_e in fp32, before quantisation


# Quantizer settings a model config may carry; VectorQuantizer.from_config reads those it has.
SETTINGS = ("beta", "ema_decay", "kmeans_init", "kmeans_iters", "dead_code_threshold", "rotation_trick")


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        beta: float = 0.25,
        ema_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        rotation_trick: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            decay=ema_decay,
            commitment_weight=0.0,  # computed below, in training and evaluation alike
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=dead_code_threshold,
            accept_image_fmap=True,
            rotation_trick=rotation_trick,
            straight_through=False,
        )

    @classmethod
    def from_config(cls, config, *, dim: int, codebook_size: int, **overrides) -> "VectorQuantizer":
        """A quantizer with the settings (``SETTINGS``) that a model config carries, then ``overrides``;
        a setting the config lacks keeps the constructor's value."""
        settings = {name: getattr(config, name) for name in SETTINGS if name in type(config).model_fields}
        return cls(dim=dim, codebook_size=codebook_size, **(settings | overrides))

    def synchronise_across_processes(self) -> bool:
        """Sum the codebook statistics (k-means, EMA counts and sums, dead-code samples) over every process.

        The library decides this when the quantizer is built, which under Lightning is before the process
        group exists; call this once it does (a LightningModule's ``setup``). Returns whether it synchronises.
        """
        import torch.distributed as dist
        from vector_quantize_pytorch.vector_quantize_pytorch import sample_vectors_distributed

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        codebook = self.vq._codebook
        codebook.use_ddp = True
        codebook.sample_fn = codebook.replace_sample_fn = sample_vectors_distributed
        codebook.kmeans_all_reduce_fn = codebook.all_reduce_fn = dist.all_reduce
        return True

    @property
    def codebook(self) -> torch.Tensor:  # (K, D)
        return self.vq.codebook

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        # Nearest-code search and EMA statistics in fp32: bf16 distances pick wrong codes.
        with torch.autocast(device_type=latents.device.type, enabled=False):
            z_e = latents.float().contiguous()
            if self.training:  # the library's path: k-means initialisation, EMA step, dead-code restarts
                quantized, indices, _ = self.vq(z_e)
                indices = indices.long()
            else:  # evaluation: only the nearest codes, by a blocked matrix product (measured 3x faster than the library's path)
                indices = self.nearest(z_e)
                quantized = self.lookup(indices)
            # beta * ||z_e - sg[e]||^2: gradient to the encoder only; the codebook follows EMA updates.
            loss = self.beta * F.mse_loss(z_e, self.lookup(indices).detach())
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss, latents=z_e)

    @torch.no_grad()
    def nearest(self, latents: torch.Tensor, block_elements: int = NEAREST_BLOCK_ELEMENTS) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) index of the nearest code (Euclidean, fp32), in blocks of at most
        ``block_elements`` distances so that memory does not grow with the batch."""
        b, d, h, w = latents.shape
        z = latents.float().permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
        return nearest_rows(z, self.codebook.float(), block_elements)[1].reshape(b, h, w)

    @torch.no_grad()
    def initialise_by_kmeans(self, samples: torch.Tensor, iters: int, *, seeding: str, seed: int = 0) -> torch.Tensor:
        """Set the codebook to the k-means centres of ``samples`` (N, D) (``kmeans``) and mark it initialised,
        so that the library's first-batch initialisation does not run. Returns the codes' cluster sizes (K,).
        The EMA statistics start from the result, as after the library's own initialisation."""
        centres, counts = kmeans(samples, self.codebook_size, iters, seeding=seeding, seed=seed)
        self.set_codebook(centres, counts)
        return counts

    @torch.no_grad()
    def set_codebook(self, centres: torch.Tensor, counts: torch.Tensor) -> None:
        """Set the codes to ``centres`` (K, D) with cluster sizes ``counts`` (K,) and mark the codebook initialised;
        the EMA statistics start from them, as after the library's own initialisation."""
        codebook = self.vq._codebook
        centres, counts = centres.to(codebook.embed), counts.to(codebook.cluster_size)
        codebook.embed.data.copy_(centres[None])
        codebook.embed_avg.data.copy_((centres * counts[:, None])[None])
        codebook.cluster_size.data.copy_(counts[None])
        codebook.initted.data.copy_(torch.tensor(True))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, D, h, w) codebook vectors."""
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}), got [{indices.min()}, {indices.max()}]")
        return self.codebook[indices.long()].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def kmeans(samples: torch.Tensor, k: int, iters: int, *, seeding: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``samples`` (N, D) in fp32 -> centres (k, D) and their cluster sizes (k,).

    Lloyd iterations from ``seed_centres``; a centre left empty moves to the sample farthest from its centre,
    so that rare vectors keep a centre of their own."""
    x = samples.float()
    n = x.shape[0]
    centres = x[seed_centres(x, k, seeding, seed)].clone()
    for _ in range(iters):
        distances, nearest = nearest_rows(x, centres)
        counts = torch.bincount(nearest, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        empty = (counts == 0).nonzero().flatten()[:n]
        if len(empty):
            centres[empty] = x[distances.topk(len(empty)).indices]
    _, nearest = nearest_rows(x, centres)
    return centres, torch.bincount(nearest, minlength=k).float()


@torch.no_grad()
def seed_centres(x: torch.Tensor, k: int, seeding: str, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    """Indices (k,) of the rows of ``x`` (N, D) that start k-means: ``random`` (distinct rows), ``kmeans++`` (each
    next row drawn with probability proportional to its squared distance from the rows chosen so far) or
    ``farthest`` (k-center greedy: the next rows are the farthest ones, so every outlier gets a seed).

    Rows are chosen ``batch`` at a time (default k // 512, at least 1): one matrix product per batch instead of
    a pass over ``x`` per row, which on a CPU makes seeding 8192 codes minutes faster; Lloyd's iterations and
    the empty-code moves afterwards absorb the rare seeds that land close together."""
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if seeding == "random" or n <= k:
        return torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(0, n, (k,), generator=generator)
    if seeding not in ("kmeans++", "farthest"):
        raise ValueError(f"unknown k-means seeding {seeding!r}; use random, kmeans++ or farthest")
    batch = batch or max(1, k // 512)
    chosen = [torch.randint(0, n, (1,), generator=generator)]
    squared = (x * x).sum(1)
    nearest = torch.full((n,), float("inf"))
    count = 1
    while count < k:
        c = x[chosen[-1]]  # (b, D): the rows chosen last
        distance = torch.addmm(squared[:, None], x, c.T, alpha=-2.0).add_((c * c).sum(1)).amin(dim=1)  # (N,) to the nearest of them
        torch.minimum(nearest, distance, out=nearest)
        b = min(batch, k - count)
        if seeding == "farthest" or not float(nearest.clamp_min(0).sum()) > 0:
            chosen.append(nearest.topk(b).indices)
        else:
            chosen.append(torch.multinomial(nearest.clamp_min(0).double(), b, replacement=False, generator=generator))
        count += b
    return torch.cat(chosen)


@torch.no_grad()
def nearest_rows(x: torch.Tensor, centres: torch.Tensor, block_elements: int = NEAREST_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D), (K, D) -> squared distance (N,) and index (N,) of each row's nearest centre, fp32, in blocks of at
    most ``block_elements`` distances."""
    squared = (centres * centres).sum(1)
    rows = max(1, block_elements // centres.shape[0])
    distances, indices = [], []
    for i in range(0, x.shape[0], rows):
        block = x[i : i + rows]
        d, j = torch.addmm(squared, block, centres.T, alpha=-2.0).min(dim=1)
        distances.append((d + (block * block).sum(1)).clamp_min(0))
        indices.append(j)
    return torch.cat(distances), torch.cat(indices)


class CodeMeans:
    """The mean of the vectors nearest each code, over vectors that arrive in batches: one Lloyd step of a codebook
    on more data than fits in memory at once (featvq moves its k-means codes, fitted on a sample, to the means of
    every training patch). Sums in float64, so how the data is batched changes the means only by rounding."""

    def __init__(self, codebook: torch.Tensor):
        self.codebook = codebook.detach().float()
        self.sums = torch.zeros(self.codebook.shape, dtype=torch.float64, device=self.codebook.device)  # (K, D)
        self.counts = torch.zeros(self.codebook.shape[0], dtype=torch.float64, device=self.codebook.device)  # (K,)

    @torch.no_grad()
    def add(self, vectors: torch.Tensor) -> None:
        """(N, D) vectors: each counts towards its nearest code (Euclidean, fp32)."""
        vectors = vectors.detach().float()
        _, nearest = nearest_rows(vectors, self.codebook)
        self.sums.index_add_(0, nearest, vectors.double())
        self.counts += torch.bincount(nearest, minlength=self.counts.numel()).double()

    def centres(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) fp32 each code moved to the mean of its vectors (a code that no vector chose keeps its place) and the
        counts (K,); ``reduce`` sums the statistics over processes first (under DDP)."""
        sums, counts = reduce(self.sums), reduce(self.counts)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], self.codebook.double())
        return means.float(), counts.float()


class PatchSample:
    """A bounded sample of vectors that does not depend on the order they arrive in or on how many
    processes see them: each vector carries a key (``sample_keys``: a hash of its scan and position), and the
    ``capacity`` vectors with the smallest keys are kept. Every vector is equally likely to be kept, memory
    stays at ``capacity`` rows, and under DDP the union of the processes' samples, cut to the ``capacity``
    smallest keys again, is exactly the sample one process would have drawn from all the data."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.vectors: torch.Tensor | None = None  # (n, D)
        self.keys: torch.Tensor | None = None  # (n,) int64

    def add(self, vectors: torch.Tensor, keys: torch.Tensor) -> None:
        vectors = vectors.detach().float().cpu()
        keys = keys.cpu()
        if self.vectors is not None:
            vectors, keys = torch.cat([self.vectors, vectors]), torch.cat([self.keys, keys])
        self.vectors, self.keys = _smallest_unique_keys(vectors, keys, self.capacity)

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.numel()

    def gathered(self) -> torch.Tensor:
        """(n, D) the sample over every process (all of them call this), in key order."""
        import torch.distributed as dist

        if self.vectors is None:
            raise ValueError("the sample is empty: no vectors were added")
        vectors, keys = self.vectors, self.keys
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([len(self)]))
            longest = int(max(s.item() for s in sizes))
            pad = longest - len(self)
            all_vectors = [torch.empty(longest, vectors.shape[1]) for _ in range(world)]
            all_keys = [torch.empty(longest, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(all_vectors, torch.cat([vectors, vectors.new_zeros(pad, vectors.shape[1])]))
            dist.all_gather(all_keys, torch.cat([keys, keys.new_zeros(pad)]))
            vectors = torch.cat([v[: int(s.item())] for v, s in zip(all_vectors, sizes)])
            keys = torch.cat([k[: int(s.item())] for k, s in zip(all_keys, sizes)])
        return _smallest_unique_keys(vectors, keys, self.capacity)[0]


def _smallest_unique_keys(vectors: torch.Tensor, keys: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with the ``capacity`` smallest keys, in key order, each key once (an epoch that repeats a scan,
    to reach its minimum size, sees its patches again with the same keys)."""
    keys, order = keys.sort(stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    keep = order[first][:capacity]
    return vectors[keep], keys[first][:capacity]


def sample_keys(scan_indices: torch.Tensor, positions: int) -> torch.Tensor:
    """(B,) dataset indices of scans -> (B * positions,) int64 pseudo-random keys, one per (scan, position),
    in the scans' raster order: the same scan and position always get the same key (splitmix64)."""
    ids = scan_indices.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(positions) + np.arange(positions, dtype=np.uint64)[None]
    z = ids.reshape(-1) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(1)).astype(np.int64))


def code_usage(counts: torch.Tensor) -> tuple[float, float]:
    """(perplexity, fraction of codes used) from a histogram of code indices."""
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    probs = counts.float() / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).float().mean())


def synchronise_quantizers(model: torch.nn.Module) -> int:
    """Call ``synchronise_across_processes`` on every quantizer inside ``model``; returns how many now synchronise.
    For a LightningModule's ``setup``, where the process group exists."""
    return sum(q.synchronise_across_processes() for q in model.modules() if isinstance(q, VectorQuantizer))
