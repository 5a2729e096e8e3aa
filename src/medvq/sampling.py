"""``medvq sample``: new images from an autoregressive prior.

Code maps are drawn token by token in raster order (keys and values of earlier tokens cached, so each
step costs one token's pass), then decoded by the prior's frozen VQ-VAE. Writes sample_NNN.png, grid.png,
codes.npy (int32, (N, h, w)), samples.json (settings and timing) and report.html (samples and code usage),
each file atomically.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.errors import MedvqError
from medvq.io import atomic_path, atomic_write_text
from medvq.models.registry import get_method, methods
from medvq.report.html import samples_report


def _save_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(N, H, W) in [0, 1] -> one (rows*H, cols*W) mosaic, white gaps."""
    n, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = im
    return grid


def sample_run(
    run_dir: str | Path,
    n: int,
    out: str | Path,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    config = run.read_config()
    method = get_method(config.method)
    if method.sampling is None:
        able = ", ".join(m.name for m in methods() if m.sampling is not None)
        raise MedvqError(f"is a '{config.method}' run, which cannot draw new images", path=run.root, fix=f"train a method that samples ({able})")
    refusal = method.sampling(config.model)
    if refusal is not None:
        raise MedvqError(refusal[0], path=run.root, fix=refusal[1])
    if top_k is not None and top_k > config.model.codebook_size:
        raise MedvqError(f"--top-k {top_k} exceeds the codebook size {config.model.codebook_size}")
    detector = Detector.load(run.root, device=device)
    sampler = detector.model.eval()  # a model of a method that samples: .sample(n, ...), .sample_length, .decode_codes(codes)
    # one generator per image, from the seed and the image's number: the same images whatever --batch-size
    states = [int(ss.generate_state(1, dtype=np.uint64)[0]) for ss in np.random.SeedSequence(seed).spawn(n)]
    generators = [torch.Generator().manual_seed(s) for s in states]
    tokens = sampler.sample_length
    out = Path(out)
    started = time.perf_counter()
    codes: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    columns = [TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("sampling", total=n * tokens)
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            done = start * tokens
            c = sampler.sample(m, temperature=temperature, top_k=top_k, generator=generators[start : start + m], on_step=lambda t: bar.update(task, completed=done + t * m))
            with torch.no_grad():
                images.append(sampler.decode_codes(c).float().clamp(0, 1).cpu())
            codes.append(c.cpu())
    seconds = time.perf_counter() - started
    code_maps = torch.cat(codes).numpy().astype(np.int32)
    pixels = torch.cat(images)[:, 0].numpy()
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(pixels):
        _save_png(out / f"sample_{i:03d}.png", im)
    _save_png(out / "grid.png", image_grid(pixels))
    with atomic_path(out / "codes.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, code_maps)
    result = {
        "run": str(run.root.resolve()),
        "n": n,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
        "latent_grid": list(code_maps.shape[1:]),
        "image_size": int(pixels.shape[-1]),
        "seconds": seconds,
        "seconds_per_image": seconds / n,
        "codes_used": int(np.unique(code_maps).size),
        "codebook_size": int(config.model.codebook_size),
    }
    atomic_write_text(out / "samples.json", json.dumps(result, indent=1))
    samples_report(out)
    return result
