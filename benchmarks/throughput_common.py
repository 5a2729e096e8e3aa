"""What the throughput benchmarks (throughput.py, classifier_throughput.py) share: their common flags,
waiting for the device before reading the clock, and the JSON file that records the machine with the figures."""

from __future__ import annotations

import argparse
import json
import platform

import torch


def parser(doc: str, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The flags every throughput benchmark takes; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_json(path: str | None, args: argparse.Namespace, device: torch.device, **figures) -> None:
    """The figures with the machine and the sizes they were measured on (nothing when ``path`` is None)."""
    if path is None:
        return
    info = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        **figures,
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
