"""Torch datasets over samples: read once, preprocess once, keep the small model inputs in memory."""

from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medvq.data.loader import prepared_batches
from medvq.data.preprocess import Geometry, Preprocessor
from medvq.data.samples import Sample
from medvq.errors import DatasetError, ImageReadError
from medvq.progress import progress_bar


@dataclass
class Batch:
    """A typed batch: images and what is known about them."""

    image: torch.Tensor  # (B, 1, S, S) float32 in [0, 1]
    valid: torch.Tensor  # (B, 1, S, S) bool
    mask: torch.Tensor | None  # (B, 1, S, S) bool, when every sample has a mask
    index: torch.Tensor  # (B,) position in the dataset
    samples: list[Sample]
    target: torch.Tensor | None = None  # (B,) int64 class targets, for supervised methods

    def to(self, device: torch.device | str) -> "Batch":
        self.image = self.image.to(device)
        self.valid = self.valid.to(device)
        self.mask = self.mask.to(device) if self.mask is not None else None
        return self


READ_BATCH = 16  # scans a reading worker prepares at a time


class ScanDataset(Dataset):
    """Preprocessed scans held in memory as float16 (1, S, S) arrays.

    ``hflip`` adds random left-right flips, ``zoom`` and ``shift`` a random rescaling by a factor in
    [1 - zoom, 1 + zoom] and a translation by up to ``shift`` of the side (border pixels repeated; valid
    region and masks follow), all for training only. ``targets`` (one integer class per sample, for
    supervised methods) adds ``target`` to every item. Reading and preprocessing happen once, at
    construction (in ``workers`` processes, 0: in this one), with a progress bar; errors name the
    offending file.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessor: Preprocessor,
        *,
        hflip: bool = False,
        zoom: float = 0.0,
        shift: float = 0.0,
        load_masks: bool = True,
        targets: Sequence[int] | None = None,
        progress: str | None = None,
        workers: int = 0,
        on_unreadable: Callable[[Sample, ImageReadError], None] | None = None,
    ):
        self.samples = list(samples)
        if targets is not None and len(targets) != len(self.samples):
            raise ValueError(f"{len(targets)} targets for {len(self.samples)} samples")
        self.targets = torch.as_tensor(list(targets), dtype=torch.long) if targets is not None else None
        self.preprocessor = preprocessor
        self.hflip, self.zoom, self.shift = hflip, zoom, shift
        self._read(load_masks, progress, workers, on_unreadable)

    def _read(self, load_masks: bool, progress: str | None, workers: int, on_unreadable: Callable[[Sample, ImageReadError], None] | None = None) -> None:
        """Read and preprocess every scan into memory; with ``on_unreadable``, a file that cannot be read is
        passed to it and left out of the dataset (otherwise its ImageReadError is raised)."""
        n, s = len(self.samples), self.preprocessor.image_size
        self.images = torch.empty(n, 1, s, s, dtype=torch.float16)
        self.valid = torch.ones(n, 1, s, s, dtype=torch.bool)
        # Datasets ship masks for lesion scans only: a scan without a mask file gets an empty mask, and
        # ``mask_known`` says which masks were read (evaluation decides what an unknown mask means).
        self.has_masks = load_masks and n > 0 and any(x.mask_path is not None for x in self.samples)
        self.masks = torch.zeros(n, 1, s, s, dtype=torch.bool) if self.has_masks else None
        self.mask_known = torch.tensor([self.has_masks and x.mask_path is not None for x in self.samples], dtype=torch.bool)
        self.geometry: list[Geometry] = []
        unread: list[int] = []

        def skip(sample: Sample, err: ImageReadError) -> None:
            unread.append(positions[id(sample)])
            on_unreadable(sample, err)

        positions = {id(x): i for i, x in enumerate(self.samples)}
        batches = prepared_batches(
            self.samples, self.preprocessor, batch_size=READ_BATCH, workers=workers, with_masks=self.has_masks, on_unreadable=skip if on_unreadable else None
        )
        with progress_bar(batches, progress) as tracked:
            for b in tracked:
                rows = torch.as_tensor(b.indices, dtype=torch.long)
                self.images[rows] = b.images.half()
                self.valid[rows] = b.valid
                if self.masks is not None and b.masks is not None:
                    self.masks[rows] = b.masks
                self.geometry.extend(b.geometry)
        if unread:  # the readable scans only, in their order (their geometry was gathered in that order)
            left_out = set(unread)
            keep = torch.as_tensor([i for i in range(n) if i not in left_out], dtype=torch.long)
            self.samples = [self.samples[i] for i in keep.tolist()]
            self.images, self.valid, self.mask_known = self.images[keep], self.valid[keep], self.mask_known[keep]
            self.masks = self.masks[keep] if self.masks is not None else None
            self.targets = self.targets[keep] if self.targets is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def _scan(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scan i: image (1, S, S) fp32, valid (1, S, S) and mask (1, S, S) or None."""
        return self.images[i].float(), self.valid[i], self.masks[i] if self.masks is not None else None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, valid, mask = self._scan(i)
        item = {"image": image, "valid": valid, "index": torch.tensor(i)}
        if mask is not None:
            item["mask"] = mask
        if self.targets is not None:
            item["target"] = self.targets[i]
        if self.hflip and torch.rand(()) < 0.5:
            item = {k: v.flip(-1) if v.ndim == 3 else v for k, v in item.items()}
        if self.zoom > 0 or self.shift > 0:
            item = self._rescale(item)
        return item

    def _rescale(self, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = torch.rand(3) * 2 - 1
        scale = 1 + self.zoom * float(u[0])  # > 1 enlarges the content
        theta = torch.tensor([[1 / scale, 0.0, 2 * self.shift * float(u[1])], [0.0, 1 / scale, 2 * self.shift * float(u[2])]])
        grid = F.affine_grid(theta[None], [1, 1, *item["image"].shape[-2:]], align_corners=False)
        warp = lambda x, mode: F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="border", align_corners=False)[0]
        out = dict(item, image=warp(item["image"], "bilinear").clamp(0, 1), valid=warp(item["valid"], "nearest") > 0.5)
        if "mask" in item:
            out["mask"] = warp(item["mask"], "nearest") > 0.5
        return out

    def batch(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        image, valid, mask = self._pixels(idx)
        return Batch(
            image=image,
            valid=valid,
            mask=mask,
            index=idx,
            samples=[self.samples[i] for i in idx.tolist()],
            target=self.targets[idx] if self.targets is not None else None,
        )

    def _pixels(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images (B, 1, S, S) fp32, valid pixels and masks (or None) of the scans ``idx``."""
        return self.images[idx].float(), self.valid[idx], self.masks[idx] if self.masks is not None else None

    def subset(self, indices: Sequence[int]) -> "ScanDataset":
        """The chosen scans as a dataset of their own, without reading anything again."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in idx.tolist()]
        out.images, out.valid = self.images[idx], self.valid[idx]
        out.masks = self.masks[idx] if self.masks is not None else None
        out.mask_known = self.mask_known[idx]
        out.targets = self.targets[idx] if self.targets is not None else None
        out.geometry = [self.geometry[i] for i in idx.tolist()]
        return out

    def blank_indices(self) -> list[int]:
        """Scans without a single valid pixel (e.g. saturated white, all taken for registration padding)."""
        return torch.nonzero(~self.valid.flatten(1).any(dim=1)).flatten().tolist()

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))

    def original_widths(self) -> np.ndarray:
        return np.array([g.width for g in self.geometry])


class StreamingScanDataset(ScanDataset):
    """The same items as ``ScanDataset``, read and preprocessed from disk each time one is asked for.

    Memory does not grow with the number of scans (for one-pass or streaming methods over large training
    sets); the price is reading every scan again in each epoch. Images are rounded through float16 exactly
    as ``ScanDataset`` stores them, so both give the same inputs. Construction only checks that every file
    exists; a scan that cannot be read stops training with an error that names it.
    """

    def _read(self, load_masks: bool, progress: str | None, workers: int, on_unreadable: Callable[[Sample, ImageReadError], None] | None = None) -> None:
        """Nothing is read ahead (``progress``, ``workers`` and ``on_unreadable`` do not apply): only check that every file exists."""
        missing = next((s.path for s in self.samples if not s.path.is_file()), None)
        if missing is not None:
            raise DatasetError("scan not found", path=missing, fix="restore the file or remove it from the dataset")
        self.has_masks = load_masks and len(self.samples) > 0 and all(x.mask_path is not None for x in self.samples)
        self.images = self.valid = self.masks = None
        self.geometry = []

    def _scan(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        _, prepared = self.preprocessor.load(self.samples[i], with_mask=self.has_masks)
        return prepared.image.half().float(), prepared.valid, prepared.mask if self.has_masks else None

    def _pixels(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        scans = [self._scan(i) for i in idx.tolist()]
        return torch.stack([s[0] for s in scans]), torch.stack([s[1] for s in scans]), torch.stack([s[2] for s in scans]) if self.has_masks else None

    def subset(self, indices: Sequence[int]) -> "StreamingScanDataset":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in idx.tolist()]
        out.targets = self.targets[idx] if self.targets is not None else None
        return out

    def batches(self, batch_size: int):
        """As ``ScanDataset.batches``, handing the memory freed by each batch back to the system before the next.

        Reading scans in this process between model calls fragments glibc's heap: exporting the codes of
        1,024 streamed scans (batches of 64, feature-space VQ) grew the resident set from 337 to 512 MB and
        kept growing with the scans (a 5,000-scan training run peaked at 2.2 GB); trimmed after each batch it
        stayed at 368 MB."""
        for batch in super().batches(batch_size):
            yield batch
            release_freed_memory()

    def original_widths(self) -> np.ndarray:
        raise NotImplementedError("a streaming dataset keeps no scan geometry; use ScanDataset for evaluation")


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc (Linux)
    except (OSError, AttributeError):
        return None  # macOS, Windows, musl: their allocators return memory themselves


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
