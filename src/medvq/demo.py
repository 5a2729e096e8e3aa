"""``medvq demo``: the whole pipeline on synthetic data, in a few minutes on a laptop CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from medvq.config import build_config
from medvq.data.phantom import PhantomConfig, write_phantom
from medvq.engine.run_dir import is_run_dir
from medvq.engine.train import train_run
from medvq.errors import DatasetError
from medvq.evaluation.evaluate import evaluate_run
from medvq.io import atomic_write_text

# A small model at 64 px: about two minutes of training on two CPU cores.
DEMO_SCANS = 600
DEMO_PHANTOM = PhantomConfig(height=256, width=256)
DEMO_CONFIG = {
    "data": {"image_size": 64, "val_fraction": 0.15, "test_fraction": 0.3},
    "model": {"hidden_channels": 64, "residual_channels": 32, "residual_layers": 2, "embedding_dim": 32, "codebook_size": 128, "downsample_layers": 2},
    "train": {"epochs": 25, "batch_size": 16, "learning_rate": 2e-3, "patience": 6, "device": "cpu"},
}


def run_demo(out: str | Path, *, n: int | None = None, epochs: int | None = None, seed: int = 0, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    out = Path(out)
    started = time.perf_counter()
    data, run = out / "data", out / "run"
    n = n or DEMO_SCANS
    console.print(f"[bold]1/3[/] writing {n} synthetic OCT scans with lesion masks -> {data}")
    try:  # the same phantom is rewritten byte for byte; anything else in DATA is never touched
        write_phantom(data, n, seed=seed, config=DEMO_PHANTOM)
    except FileExistsError as err:
        raise DatasetError(f"holds other data than this demo's phantom ({err})", path=data, fix="use another --out (or the same -n and --seed)") from None

    layers = dict(DEMO_CONFIG)
    layers["train"] = {**DEMO_CONFIG["train"], "seed": seed, **({"epochs": epochs} if epochs else {})}
    config = build_config(layers, source="demo preset")
    console.print("[bold]2/3[/] training a VQ-VAE on the NORMAL scans of the training patients")
    if run.exists() and any(run.iterdir()) and not is_run_dir(run):
        raise DatasetError("is not a medvq run folder; the demo replaces only its own run", path=run, fix="use another --out")
    train_run(config, data, run, overwrite=True, console=console)  # an earlier demo run is replaced only once the new one is complete

    console.print("[bold]3/3[/] scoring held-out patients (NORMAL, CNV, DME, DRUSEN) and writing the report")
    result = evaluate_run(run, data, out, console=console)
    result["demo_seconds"] = time.perf_counter() - started
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1))
    console.print(f"demo finished in {result['demo_seconds']:.0f}s")
    return result
