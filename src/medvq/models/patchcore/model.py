"""PatchCore (Roth et al. 2022): a memory bank of normal patch features, nearest-neighbour distances.

Frozen ImageNet EfficientNet-Lite0 -> outputs of mid-level stages (stages 2 and 3, stride 4 and 8, by
default) -> each optionally averaged over a k x k neighbourhood (local aggregation, stride 1) -> deeper
grids upsampled bilinearly to the finest -> concatenated: one feature vector per patch of the finest
grid (stride 4 by default: 32 x 32 patches at 128 px). The memory bank holds a
greedy coreset of the training patches (``coreset.py``, filled by ``fit.py``). A test patch's anomaly is
its Euclidean distance to the nearest bank entry; the image score is the largest patch distance,
re-weighted by how isolated that nearest entry is among its own neighbours in the bank (paper, eq. 7).

The memory bank is a buffer, so it is saved and loaded with the backbone weights in one safetensors
file; its length comes from the file. Distances are computed in fp32 in blocks of a fixed number of
entries, so inference memory stays bounded however large the bank grows. Knows nothing of files, CLIs or training loops.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from medvq.models.backbones.patch_features import PatchFeatures
from medvq.models.patchcore.config import PatchCoreConfig
from medvq.models.inputs import check_images
from medvq.models.quantizer import NEAREST_BLOCK_ELEMENTS

@dataclass
class PatchCoreOutput:
    distances: torch.Tensor  # (B, h, w) Euclidean distance of each patch to its nearest bank entry
    nearest: torch.Tensor  # (B, h, w) index of that entry in the bank
    score: torch.Tensor  # (B,) re-weighted largest patch distance


class PatchCore(nn.Module):
    def __init__(self, config: PatchCoreConfig, distance_block_elements: int = NEAREST_BLOCK_ELEMENTS):
        super().__init__()
        self.config = config
        # Query rows per distance block shrink as the bank grows: a block holds at most this many fp32 distances
        # (64 MB by default), whatever the bank size.
        self.distance_block_elements = distance_block_elements
        self.features = PatchFeatures(config)
        self.register_buffer("memory_bank", torch.zeros(0, config.feature_dim))  # (N, D), filled by fit
        self.eval()

    @property
    def stride(self) -> int:
        return self.config.stride

    def train(self, mode: bool = True) -> "PatchCore":
        """The backbone is frozen: its BatchNorm layers always use their ImageNet running statistics."""
        return super().train(False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The bank's length is known only from the file: take its shape before the strict copy.
        key = prefix + "memory_bank"
        bank = state_dict.get(key)
        if bank is not None:
            if bank.ndim != 2 or bank.shape[1] != self.config.feature_dim:
                error_msgs.append(f"memory_bank of shape {tuple(bank.shape)} does not fit features of dimension {self.config.feature_dim}")
                return
            self.memory_bank = torch.empty_like(bank, dtype=self.memory_bank.dtype, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        if bank.ndim != 2 or bank.shape[1] != self.config.feature_dim or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be (N > 0, {self.config.feature_dim}), got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().to(self.memory_bank.device, torch.float32).contiguous()

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_channels, self.stride)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> locally aggregated patch features (B, D, S/g, S/g), fp32 (g = grid_stride)."""
        self.check_input(images)
        return self.features.embed(images)

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (N, D) -> Euclidean distances (N, k) to their k nearest bank entries, ascending, and the entries' indices (N, k)."""
        bank = self.memory_bank
        if bank.shape[0] == 0:
            raise RuntimeError("the memory bank is empty: fit the model (medvq train patchcore) or load its weights")
        k = min(k, bank.shape[0])
        bank = bank.float()
        bank_sq = (bank * bank).sum(1)  # (N_bank,)
        dists, index = [], []
        rows = max(1, self.distance_block_elements // bank.shape[0])
        for start in range(0, queries.shape[0], rows):
            q = queries[start : start + rows].float()
            # ||b||^2 - 2 q.b in one fused matmul (fp32) ranks the entries; ||q||^2 does not change the ranking
            d2 = torch.addmm(bank_sq, q, bank.T, alpha=-2.0)
            idx = argmin_rows(d2) if k == 1 else torch.topk(d2, k, dim=1, largest=False).indices
            # the winners' distances directly: the expanded form cancels near zero (a patch close to a bank entry),
            # where its fp32 rounding differed between runtimes by 1e-2 after the square root
            dists.append(torch.linalg.vector_norm(q[:, None, :] - bank[idx], dim=-1))
            index.append(idx)
        return torch.cat(dists), torch.cat(index)

    @torch.no_grad()
    def image_scores(self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """patches (B, P, D), distances and nearest (B, P) -> (B,) re-weighted maximum (Roth et al. 2022, eq. 7).

        s* = the largest patch distance, m* = the bank entry nearest to that patch; with N_b(m*) the b nearest
        bank entries of m* (m* first), w = 1 - softmax_j(||m_test - n_j||)[m*]; the score is w * s*.
        """
        b = torch.arange(patches.shape[0], device=patches.device)
        top = distances.argmax(dim=1)  # (B,)
        s_star = distances[b, top]
        if self.config.reweight_neighbours <= 1:
            return s_star
        m_test = patches[b, top]  # (B, D)
        m_star = self.memory_bank[nearest[b, top]]  # (B, D)
        _, support = self.nearest(m_star, self.config.reweight_neighbours)  # (B, n) nearest entries of m*, m* itself first
        d = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)  # (B, n)
        weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weight * s_star

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> PatchCoreOutput:
        feats = self.embed(images)  # (B, D, h, w)
        bsz, dim, h, w = feats.shape
        patches = feats.permute(0, 2, 3, 1).reshape(bsz, h * w, dim)  # (B, P, D), row-major patches
        dist, idx = self.nearest(patches.reshape(-1, dim))
        dist, idx = dist[:, 0].reshape(bsz, h * w), idx[:, 0].reshape(bsz, h * w)
        score = self.image_scores(patches, dist, idx)
        return PatchCoreOutput(distances=dist.reshape(bsz, h, w), nearest=idx.reshape(bsz, h, w), score=score)


def argmin_rows(d: torch.Tensor) -> torch.Tensor:
    """(N, M) -> (N, 1) column of each row's smallest value (the first of equal ones). On the CPU numpy's
    argmin, measured 5x faster than torch's over rows of a memory bank's width; torch's when traced."""
    if d.device.type == "cpu" and not torch.jit.is_tracing() and not d.requires_grad:
        return torch.from_numpy(d.numpy().argmin(axis=1))[:, None]
    return d.argmin(dim=1, keepdim=True)


def prepare_for_export(model: PatchCore) -> bool:
    """One distance block for any batch: a traced graph keeps the block loop of the batch it was traced with."""
    model.distance_block_elements = 2**62
    return True  # the graph takes any batch size


def build_model(config: PatchCoreConfig) -> PatchCore:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return PatchCore(config)
