"""Code NLL map: -log p(the code at each position | its context) under a prior over a code grid.

NLL = logsumexp(logits) - logit of the true code, over the code axis (dim 1), in fp32. Written this way
rather than as a gathered log-softmax because a log-softmax over a dimension that is not the last copies
the whole logit tensor first (the priors emit positions last: a feature-space VQ prior's (B, K, N) logits
are a transposed view), and only one entry per position is needed.
"""

from __future__ import annotations

import torch


def code_nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """-log p(true code) at every position: logits (B, K, *grid), codes (B, *grid) -> (B, *grid) nats, fp32."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=1) - logits.gather(1, codes.long().unsqueeze(1)).squeeze(1)
