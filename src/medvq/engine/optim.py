"""The optimiser and learning-rate schedule live with the training wrappers that use them
(``medvq.models.optim``); this module keeps their older import path working."""

from medvq.models.optim import COSINE_FLOOR, WARMUP_STEPS, configure_adamw, lr_factor

__all__ = ["COSINE_FLOOR", "WARMUP_STEPS", "configure_adamw", "lr_factor"]
