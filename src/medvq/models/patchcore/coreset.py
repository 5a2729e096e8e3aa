"""Greedy coreset subsampling of patch features (Sener & Savarese 2018, as used by PatchCore).

``greedy_coreset`` is the k-center greedy: start at one point, then repeatedly add the point farthest
from everything chosen so far, so the kept points cover the set with the smallest radius greedy can
give. As in the PatchCore paper, distances are taken after a seeded Gaussian random projection
(Johnson-Lindenstrauss: pairwise distances kept up to a small factor), which makes each step cheaper.

``StreamingCoreset`` bounds memory and time for large training sets: patches arrive batch by batch,
are buffered up to ``chunk_patches`` and each full chunk is reduced to ``ratio`` of its size on its own.
Memory is one chunk plus the bank; time is linear in the number of patches (each step of the greedy
touches one chunk, which fits in the CPU cache at the default size). Each step is one matrix-vector
product and a running minimum, in fp32.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


def projection_matrix(dim_in: int, dim_out: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Seeded Gaussian random projection (dim_in, dim_out) scaled by 1/sqrt(dim_out); None when it would not reduce."""
    if dim_out <= 0 or dim_out >= dim_in:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)).to(device)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """A greedy step is one small matrix-vector product: on a CPU, waking a second thread for it costs more
    than it saves (measured 2-4x slower on 2 busy cores), so the loop runs on one thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def greedy_coreset(features: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of ``features`` (N, D), starting at index ``start``.

    Each step adds the point whose distance to the nearest chosen point is largest (ties: lowest index).
    """
    x = features.float().contiguous()
    count = x.shape[0]
    if not 0 < n <= count:
        raise ValueError(f"cannot choose {n} of {count} points")
    if not 0 <= start < count:
        raise ValueError(f"start index {start} outside 0..{count - 1}")
    sq = (x * x).sum(1)  # (N,)
    min_d2 = torch.full((count,), float("inf"), device=x.device)
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    idx = torch.tensor(start, device=x.device)
    with _one_cpu_thread(x.device):
        for i in range(n):  # tensors only: no host synchronisation per step on a GPU
            chosen[i] = idx
            d2 = torch.mv(x, x[idx]).mul_(-2.0).add_(sq).add_(sq[idx])  # squared distances to the new point
            torch.minimum(min_d2, d2, out=min_d2)
            min_d2[idx] = -float("inf")  # never chosen twice, whatever the rounding of its own distance
            idx = torch.argmax(min_d2)
    return chosen


def coreset_size(count: int, ratio: float) -> int:
    return max(1, min(count, int(round(ratio * count))))


class StreamingCoreset:
    """Collects a greedy coreset of ``ratio`` of all patches added, one chunk at a time.

    ``add(patches)`` takes (n, D) features; ``finish()`` returns the bank (M, D) with M = sum over chunks of
    round(ratio * chunk size). Deterministic for a given seed and input order.
    """

    def __init__(self, dim: int, ratio: float, chunk_patches: int = 16384, projection_dim: int = 128, seed: int = 0, device: torch.device | str = "cpu"):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.dim, self.ratio, self.chunk_patches = dim, ratio, chunk_patches
        self.device = torch.device(device)
        self.projection = projection_matrix(dim, projection_dim, seed, self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._kept: list[torch.Tensor] = []
        self.patches_seen = 0
        self.chunks = 0

    def add(self, patches: torch.Tensor) -> None:
        if patches.ndim != 2 or patches.shape[1] != self.dim:
            raise ValueError(f"expected patches of shape (n, {self.dim}), got {tuple(patches.shape)}")
        self._buffer.append(patches.detach().to(self.device, torch.float32))
        self._buffered += patches.shape[0]
        self.patches_seen += patches.shape[0]
        while self._buffered >= self.chunk_patches:
            data = torch.cat(self._buffer)
            self._reduce(data[: self.chunk_patches])
            rest = data[self.chunk_patches :]
            self._buffer, self._buffered = ([rest.clone()] if rest.shape[0] else []), rest.shape[0]

    def _reduce(self, chunk: torch.Tensor) -> None:
        n = coreset_size(chunk.shape[0], self.ratio)
        if n == chunk.shape[0]:
            self._kept.append(chunk.clone())
        else:
            reduced = chunk @ self.projection if self.projection is not None else chunk
            start = int(torch.randint(chunk.shape[0], (1,), generator=self.generator))
            self._kept.append(chunk[greedy_coreset(reduced, n, start)].clone())
        self.chunks += 1

    def finish(self) -> torch.Tensor:
        """The memory bank (M, D), fp32; reduces the last partial chunk."""
        if self._buffered:
            self._reduce(torch.cat(self._buffer))
            self._buffer, self._buffered = [], 0
        if not self._kept:
            raise ValueError("no patches were added")
        return torch.cat(self._kept)
