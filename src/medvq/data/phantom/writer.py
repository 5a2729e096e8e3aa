"""A phantom dataset on disk in the OCT2017 layout, split by patient, every file written atomically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medvq.data.phantom.config import CLASSES, SPLITS, PhantomConfig
from medvq.data.phantom.render import make_scan
from medvq.io import atomic_path, atomic_write_text


# --------------------------------------------------------------------------- dataset writer


def _quota(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions."""
    raw = [n * f for f in fractions]
    out = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - out[i], -i), reverse=True)
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def _check_fractions(name: str, values: list[float], count: int) -> None:
    if len(values) != count:
        raise ValueError(f"{name} must have {count} entries, got {len(values)}")
    if any((not math.isfinite(v)) or v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative numbers, got {values!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {sum(values):.6g}")


def _settings(
    n: int,
    seed: int,
    config: PhantomConfig,
    split_fractions: tuple[float, float, float],
    class_fractions: dict[str, float] | None,
    scans_per_patient: tuple[int, int],
) -> dict:
    """The checked settings of a phantom, as phantom.json records them."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(config, PhantomConfig):
        raise ValueError(f"config must be a PhantomConfig, got {type(config).__name__}")
    splits = [float(f) for f in split_fractions]
    _check_fractions("split_fractions", splits, 3)
    if class_fractions is None:
        class_fractions = {"NORMAL": 0.5, "CNV": 0.5 / 3, "DME": 0.5 / 3, "DRUSEN": 0.5 / 3}
    unknown = sorted(set(class_fractions) - set(CLASSES))
    if unknown:
        raise ValueError(f"class_fractions has unknown classes {unknown}; valid: {', '.join(CLASSES)}")
    cf = [float(class_fractions.get(c, 0.0)) for c in CLASSES]
    _check_fractions("class_fractions", cf, len(CLASSES))
    lo, hi = (int(v) for v in scans_per_patient)
    if not 1 <= lo <= hi:
        raise ValueError(f"scans_per_patient must be (low, high) with 1 <= low <= high, got {scans_per_patient!r}")
    return {
        "generator": "medvq.data.phantom",
        "format": 1,
        "seed": int(seed),
        "n": int(n),
        "config": config.model_dump(mode="json"),
        "split_fractions": splits,
        "class_fractions": dict(zip(CLASSES, cf)),
        "scans_per_patient": [lo, hi],
    }


def _check_root(root: Path, settings: dict) -> None:
    """A root may hold nothing yet, or a phantom of the same settings (finished or not)."""
    meta_path = root / "phantom.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        old.pop("counts", None)
        old.pop("complete", None)
        if old != json.loads(json.dumps(settings)):
            raise FileExistsError(f"{root} already holds a phantom made with other settings; use an empty root")
    elif root.exists() and any((root / d).exists() for d in (*SPLITS, "masks")):
        raise FileExistsError(f"{root} already holds data without phantom.json; use an empty root")


def _plan(settings: dict) -> tuple[list[tuple[str, str, int, int]], dict[str, dict[str, int]]]:
    """Patients per class, then patients to splits (stratified by class, by scan count): the scans
    (split, class, patient, k) and the counts per split and class."""
    seed, n, splits = settings["seed"], settings["n"], settings["split_fractions"]
    cf = [settings["class_fractions"][c] for c in CLASSES]
    lo, hi = settings["scans_per_patient"]
    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    scans: list[tuple[str, str, int, int]] = []  # split, class, patient, k
    used_ids: set[int] = set()
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    for cls, quota in zip(CLASSES, _quota(n, cf)):
        patients = []
        left = quota
        while left > 0:
            k = min(left, int(plan_rng.integers(lo, hi + 1)))
            pid = int(plan_rng.integers(10_000, 10_000_000))
            while pid in used_ids:
                pid = int(plan_rng.integers(10_000, 10_000_000))
            used_ids.add(pid)
            patients.append((pid, k))
            left -= k
        order = plan_rng.permutation(len(patients))
        target = [quota * f for f in splits]
        filled = [0, 0, 0]
        for j in order:
            pid, k = patients[j]
            deficit = [target[i] - filled[i] - 0.5 * k if splits[i] > 0 else -math.inf for i in range(3)]
            si = int(np.argmax(deficit))
            filled[si] += k
            counts[SPLITS[si]][cls] += k
            scans.extend((SPLITS[si], cls, pid, kk) for kk in range(1, k + 1))
    return scans, counts


def write_phantom(
    root: str | Path,
    n: int,
    *,
    seed: int = 0,
    config: PhantomConfig = PhantomConfig(),
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    class_fractions: dict[str, float] | None = None,
    scans_per_patient: tuple[int, int] = (1, 3),
    progress: bool = False,
) -> Path:
    """Write n scans in the OCT2017 layout (split by patient) with lesion masks; return root.

    Images go to ``root/{split}/{CLASS}/{CLASS}-{patient}-{k}.jpeg``, masks (255 =
    lesion) to ``root/masks/{split}/{CLASS}/...png`` and the settings to
    ``root/phantom.json``. Same seed, same bytes.
    """
    settings = _settings(n, seed, config, split_fractions, class_fractions, scans_per_patient)
    root = Path(root)
    _check_root(root, settings)
    scans, counts = _plan(settings)

    meta_path = root / "phantom.json"
    meta = dict(settings, counts=counts, complete=False)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for split in SPLITS:
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / cls).mkdir(parents=True, exist_ok=True)

    for i, (split, cls, pid, k) in enumerate(scans):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), pid, k]))
        img, mask = make_scan(cls, rng, config)
        name = f"{cls}-{pid}-{k}"
        with atomic_path(root / split / cls / f"{name}.jpeg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=config.jpeg_quality)
        with atomic_path(root / "masks" / split / cls / f"{name}.png") as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        if progress and (i + 1 == len(scans) or (i + 1) % max(1, len(scans) // 20) == 0):
            print(f"phantom: {i + 1}/{len(scans)} scans", file=sys.stderr, flush=True)

    meta["complete"] = True
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return root
