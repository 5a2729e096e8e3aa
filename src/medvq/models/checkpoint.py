"""Model weights on disk: ``model/{best,last}.safetensors`` below a run's folder, loaded with errors that name
the file and the fix. The run directory (``medvq.engine.run_dir``) and models that copy another run's
frozen weights (a prior's VQ-VAE) read weights through here."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from medvq.errors import CheckpointError


def weights_path(root: str | Path, which: str = "best") -> Path:
    return Path(root) / "model" / f"{which}.safetensors"


def load_run_weights(model: nn.Module, root: str | Path, which: str = "best") -> nn.Module:
    """Load a run's ``which`` weights into ``model`` (``best`` falls back to ``last`` while no epoch has validated)."""
    path = weights_path(root, which)
    if not path.is_file():
        fallback = weights_path(root, "last")
        if which == "best" and fallback.is_file():
            path = fallback
        else:
            raise CheckpointError(f"no {which} weights", path=path, fix="has training finished at least one epoch?")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:  # truncated, garbage or not a safetensors file at all
        raise CheckpointError(
            f"damaged or not a safetensors file ({str(err).splitlines()[0][:200]})",
            path=path,
            fix="copy the run again from where it was trained, or train it again",
        ) from None
    except Exception as err:  # shape mismatches surface as RuntimeError from load_state_dict
        raise CheckpointError(
            f"weights do not fit the model built from config.yaml ({str(err).splitlines()[0][:300]})",
            path=path,
            fix="the checkpoint comes from a different configuration; use the config.yaml it was trained with",
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit the model built from config.yaml (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
            path=path,
            fix="the checkpoint comes from a different configuration; use the config.yaml it was trained with",
        )
    return model
