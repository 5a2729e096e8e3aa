"""Feature-space VQ: frozen ImageNet patch features quantised by a codebook, and a prior over the code grid.

Frozen EfficientNet-Lite0 -> PatchCore's patch features (``PatchFeatureConfig``: stages 2 + 3, one 64-dim
vector per 4 x 4 pixels) -> the project's vector quantizer with K codes (k-means initialisation, EMA
updates, dead-code restarts, fp32 distances). The codebook plays the memory bank of PatchCore at a fixed
size: ||f - e_k*||^2, the squared distance of a patch to its nearest code, is the ``quantization_distance``
map, at a cost that does not grow with the training set.

The prior predicts each position's code from the codes around it (``CodePrior``). Its keys and values are
built from each code and its position alone, never mixed across positions, and every query attends to all
positions but its own (bidirectional) or to the positions before it in raster order (causal). So position
i's prediction never sees code i, and one forward pass gives -log p(k*_i | context) at every position at
once: the ``nll`` map. Training hides a random share of the context codes as well (masked-code training),
so that a prediction does not lean on any single neighbour.

Knows nothing of files, CLIs or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvq.maps.nll import code_nll
from medvq.models.backbones.patch_features import PatchFeatures
from medvq.models.featvq.config import FeatVQConfig
from medvq.models.quantizer import VectorQuantizer, kmeans, nearest_rows


@dataclass
class FeatVQOutput:
    features: torch.Tensor  # (B, D, h, w) fp32 patch features
    codes: torch.Tensor  # (B, h, w) int64 nearest code of each patch
    distances: torch.Tensor  # (B, h, w) fp32 ||f - e_k*||^2


class PriorLayer(nn.Module):
    """Queries attend to the (never mixed) code tokens; then an MLP on the queries. Pre-norm, residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """query (B, N, C), tokens (B, 1 + N, C), allowed (B or 1, 1, N, 1 + N) bool -> query (B, N, C)."""
        b, n, c = query.shape
        split = lambda t: t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, L, C/heads)
        q = split(self.q(self.norm_q(query)))
        k, v = self.kv(self.norm_kv(tokens)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, split(k), split(v), attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        query = query + self.proj(out.transpose(1, 2).reshape(b, n, c))
        return query + self.mlp(self.norm_mlp(query))


class CodePrior(nn.Module):
    """Code grid (B, h, w) -> logits (B, K, h, w) of each position's code given the others (see module docstring).

    Token j = embedding(code_j) + a learned view of j's fixed 2D sine-cosine position code (so any grid size
    works); an extra always-visible token (no code) lets a query with no visible context (the first position of
    the causal order) still attend. Query i starts from another learned view of its position and never sees token i.
    """

    def __init__(self, codebook_size: int, dim: int, layers: int, heads: int, context: str, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"prior_dim {dim} is not divisible by prior_heads {heads}")
        self.context = context
        self.code_embedding = nn.Embedding(codebook_size, dim)
        self.token_position = nn.Linear(dim, dim)  # learned views of the fixed sine-cosine position code
        self.query_position = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.empty_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(PriorLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)

    def context_mask(self, n: int, device: torch.device) -> torch.Tensor:
        """(N, 1 + N) bool: query i may see the empty token and token j (j != i, or j < i when causal)."""
        i = torch.arange(n, device=device)
        own = (i[None, :] < i[:, None]) if self.context == "causal" else (i[None, :] != i[:, None])
        return torch.cat([torch.ones(n, 1, dtype=torch.bool, device=device), own], dim=1)

    def forward(self, codes: torch.Tensor, hidden: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, w); hidden (B, h, w) bool marks codes no query may see (masked-code training) -> logits (B, K, h, w) fp32.

        ``queries`` (B, M) raster indices: predict only those positions (training), -> logits (B, K, M).
        """
        with torch.autocast("cpu", enabled=False):  # bf16 autocast ran this small transformer 2-3x slower on the CPU
            return self._forward(codes, hidden, queries)

    def _forward(self, codes: torch.Tensor, hidden: torch.Tensor | None, queries: torch.Tensor | None) -> torch.Tensor:
        b, h, w = codes.shape
        position = sincos_positions(h, w, self.code_embedding.embedding_dim, codes.device)  # (1, N, C)
        tokens = self.code_embedding(codes.reshape(b, h * w)) + self.token_position(position)  # (B, N, C): each token its own code and place only
        tokens = torch.cat([self.empty_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, C)
        allowed = self.context_mask(h * w, codes.device)[None, None]  # (1, 1, N, 1 + N)
        query = self.query_position(position).expand(b, -1, -1)  # (B, N, C)
        if queries is not None:  # (B, M): only these rows of the queries and of the mask
            query = query.gather(1, queries[..., None].expand(-1, -1, query.shape[-1]))  # (B, M, C)
            allowed = allowed[0, 0][queries][:, None]  # (B, 1, M, 1 + N)
        if hidden is not None:
            visible = torch.cat([hidden.new_ones(b, 1), ~hidden.reshape(b, h * w)], dim=1)  # (B, 1 + N)
            allowed = allowed & visible[:, None, None, :]
        for layer in self.layers:
            query = layer(query, tokens, allowed)
        logits = self.head(self.norm(query)).float().transpose(1, 2)  # (B, K, N or M)
        return logits if queries is not None else logits.reshape(b, -1, h, w)


def sincos_positions(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """(1, h * w, dim) fixed 2D sine-cosine position code (half the channels for rows, half for columns), raster order."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter)))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # (h, dim/4)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # (w, dim/4)
    code = torch.cat(
        [rows.sin()[:, None].expand(h, w, quarter), rows.cos()[:, None].expand(h, w, quarter), cols.sin()[None].expand(h, w, quarter), cols.cos()[None].expand(h, w, quarter)],
        dim=-1,
    )  # (h, w, 4 * quarter)
    code = F.pad(code, (0, dim - 4 * quarter))
    return code.reshape(1, h * w, dim)


class FeatVQ(nn.Module):
    def __init__(self, config: FeatVQConfig):
        super().__init__()
        self.config = config
        self.features = PatchFeatures(config)
        # beta 0: the features are frozen, nothing to commit
        self.quantizer = VectorQuantizer.from_config(config, dim=config.feature_dim, codebook_size=config.codebook_size, beta=0.0)
        k, groups = config.codebook_size, config.prior_vocabulary
        self.vocabulary = groups if 0 < groups < k else k
        # code -> its group (set by ``group_codes`` once the codebook exists); stored with the weights only when codes are grouped
        self.register_buffer("code_groups", torch.arange(k) % self.vocabulary, persistent=self.vocabulary < k)
        self.prior = CodePrior(self.vocabulary, config.prior_dim, config.prior_layers, config.prior_heads, config.prior_context, config.prior_dropout)

    @property
    def stride(self) -> int:
        return self.config.stride

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of the model stride {self.stride}; resize the input (data.image_size) to a multiple of it"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> patch features (B, D, S/4, S/4), fp32 whatever the caller's autocast."""
        self.check_input(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.features.embed(images.float())

    def quantize(self, features: torch.Tensor) -> FeatVQOutput:
        """Nearest codes and squared distances (fp32); in training mode the codebook also takes its EMA step."""
        q = self.quantizer(features)
        with torch.autocast(features.device.type, enabled=False):
            distances = (features.float() - q.quantized.detach().float()).pow(2).sum(dim=1)  # (B, h, w)
        return FeatVQOutput(features=features, codes=q.indices, distances=distances)

    def forward(self, images: torch.Tensor) -> FeatVQOutput:
        return self.quantize(self.encode(images))

    @torch.no_grad()
    def group_codes(self, iters: int) -> None:
        """Group the codebook's codes by k-means of their vectors into the prior's vocabulary (no-op when every code is its own).
        k-means++ seeding: groups of common patterns for the prior, where the codebook's farthest-point seeding would spend
        groups on single outlying codes."""
        if self.vocabulary < self.config.codebook_size:
            centres, _ = kmeans(self.quantizer.codebook, self.vocabulary, iters, seeding="kmeans++")
            self.code_groups.copy_(nearest_rows(self.quantizer.codebook.float(), centres)[1])

    def prior_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grid (B, h, w) -> what the prior reads and predicts there: each code's group."""
        return self.code_groups[codes]

    def prior_logits(self, codes: torch.Tensor, hidden: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the prior's vocabulary (B, V, h, w) (or (B, V, M) at ``queries``) from the code grid (B, h, w)."""
        return self.prior(self.prior_tokens(codes), hidden, queries)

    def code_nll(self, codes: torch.Tensor) -> torch.Tensor:
        """-log p(group of each position's code | the groups around it): (B, h, w) codes -> (B, h, w) nats."""
        return code_nll(self.prior_logits(codes), self.prior_tokens(codes))


def build_model(config: FeatVQConfig) -> FeatVQ:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return FeatVQ(config)
