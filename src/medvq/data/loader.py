"""Reading and preprocessing scans in worker processes, in batches, while the caller runs the model.

    for batch in prepared_batches(samples, preprocessor, batch_size=32, workers=2):
        model(batch.images)            # the workers read and prepare the next batches meanwhile

A torch DataLoader does the work: each worker prepares whole batches, in order, and hands back the
tensors through shared memory. Workers start only when there is more than one batch to prepare (a single
batch gains nothing from them and would pay their start-up). While the caller waits for batches, it keeps
only the cores the workers leave for its own torch threads (at least one): on two cores, two torch threads
beside two busy workers spend their time waiting for each other (scoring ran at half the rate); while
batches wait for the caller, it uses all its threads (``ThreadShare``). A file that cannot be read raises its
``MedvqError`` in the calling process, naming the file, as reading it there would; with ``on_unreadable``
an unreadable image (``ImageReadError``) is handed to it instead and left out of the batches.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medvq.data.preprocess import Geometry, Preprocessor
from medvq.data.samples import Sample
from medvq.errors import ImageReadError, MedvqError


@dataclass
class PreparedBatch:
    """Model inputs for consecutive samples, and what is needed to map results back onto each scan."""

    start: int  # position of the first sample in the sequence given
    samples: list[Sample]
    indices: list[int]  # position of each sample in the sequence given (consecutive unless unreadable ones were left out)
    images: torch.Tensor  # (B, 1, S, S) float32 in [0, 1]
    valid: torch.Tensor  # (B, 1, S, S) bool
    masks: torch.Tensor | None  # (B, 1, S, S) bool, when asked for and every sample has a mask
    geometry: list[Geometry]
    originals: list[np.ndarray] | None  # the scans as read, (H, W) each, when asked for

    def subset(self, rows: list[int]) -> "PreparedBatch":
        """The chosen rows only (``start`` stays that of the whole batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return PreparedBatch(
            start=self.start,
            samples=[self.samples[i] for i in rows],
            indices=[self.indices[i] for i in rows],
            images=self.images[idx],
            valid=self.valid[idx],
            masks=self.masks[idx] if self.masks is not None else None,
            geometry=[self.geometry[i] for i in rows],
            originals=[self.originals[i] for i in rows] if self.originals is not None else None,
        )


class _Prepare(Dataset):
    def __init__(self, samples: Sequence[Sample], preprocessor: Preprocessor, keep_originals: bool, with_masks: bool):
        self.samples, self.preprocessor = list(samples), preprocessor
        self.keep_originals, self.with_masks = keep_originals, with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            original, prepared = self.preprocessor.load(self.samples[i], with_mask=self.with_masks)
        except MedvqError as err:  # returned, not raised: the caller raises it as it is, not wrapped by the worker
            return i, err
        return i, torch.from_numpy(original) if self.keep_originals else None, prepared


def _collate(items: list) -> dict:
    """Runs in the worker: one stacked tensor per field crosses to the caller, not one per scan; the errors
    of files that could not be read go along (``failed``), and ``images`` is None when none could."""
    failed = [item for item in items if len(item) == 2]  # (position, error) of a file that could not be read
    items = [item for item in items if len(item) == 3]
    if not items:
        return {"failed": failed, "images": None}
    prepared = [p for _, _, p in items]
    return {
        "failed": failed,
        "indices": [i for i, _, _ in items],
        "images": torch.stack([p.image for p in prepared]),
        "valid": torch.stack([p.valid for p in prepared]),
        "masks": torch.stack([p.mask if p.mask is not None else torch.zeros_like(p.valid) for p in prepared]) if any(p.mask is not None for p in prepared) else None,
        "geometry": [p.geometry for p in prepared],
        "originals": [o for _, o, _ in items] if items[0][1] is not None else None,
    }


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadShare:
    """The calling process's torch threads beside ``workers`` reading processes, chosen batch by batch: only
    the cores the workers leave (at least one) while the caller has to wait for batches (the workers are
    busy), all of them again while the next batch is ready when asked for (the caller's model is the slower
    stage and the workers wait with full queues)."""

    def __init__(self, workers: int):
        self.full = torch.get_num_threads()
        self.cut = max(1, min(self.full, usable_cores() - workers)) if workers else self.full

    def choose(self, waited: float, worked: float) -> int:
        """Threads for the next batch, from the seconds the caller ``waited`` for it and ``worked`` on the last."""
        threads = self.cut if waited > 0.05 * worked else self.full
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def restore(self) -> None:
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)


def prepared_batches(
    samples: Sequence[Sample],
    preprocessor: Preprocessor,
    *,
    batch_size: int,
    workers: int = 0,
    keep_originals: bool = False,
    with_masks: bool = False,
    on_unreadable: Callable[[Sample, ImageReadError], None] | None = None,
) -> Iterator[PreparedBatch]:
    """Batches of prepared scans in the order of ``samples``; ``workers`` processes read ahead (0: none).
    A file that cannot be read raises its error, or with ``on_unreadable`` (for ``ImageReadError``) is
    passed to it with its error and left out."""
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    samples = list(samples)
    with_masks = with_masks and any(s.mask_path is not None for s in samples)  # lesion scans may be the only ones with masks
    n_batches = -(-len(samples) // batch_size)
    workers = min(workers, n_batches) if n_batches > 1 else 0
    loader = DataLoader(
        _Prepare(samples, preprocessor, keep_originals, with_masks),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    share, batches, worked = ThreadShare(workers), iter(loader), 0.0
    try:
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            for i, err in batch["failed"]:
                if on_unreadable is None or not isinstance(err, ImageReadError):
                    raise err
                on_unreadable(samples[i], err)
            if batch["images"] is None:
                continue
            share.choose(time.perf_counter() - asked, worked)
            handed = time.perf_counter()
            yield PreparedBatch(
                start=batch["indices"][0],
                samples=[samples[i] for i in batch["indices"]],
                indices=batch["indices"],
                images=batch["images"],
                valid=batch["valid"],
                masks=batch["masks"],
                geometry=batch["geometry"],
                originals=[o.numpy() for o in batch["originals"]] if batch["originals"] is not None else None,
            )
            worked = time.perf_counter() - handed
    finally:
        share.restore()
