"""Figures as pure functions of saved numbers and arrays (matplotlib, Agg backend)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from medvq.io import atomic_save_figure  # noqa: E402


def _save(fig, path: str | Path) -> None:
    atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_history(history: Sequence[dict], plots_dir: str | Path) -> None:
    """loss.png (train/val loss per epoch), codebook.png (perplexity and share of codes used, per code level
    when keys are ``perplexity_<level>``) and ssim.png (any ``*_ssim`` key)."""
    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE + commitment)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, Path(plots_dir) / "loss.png")

    keys = list(dict.fromkeys(k for r in history for k in r))
    levels = [k.removeprefix("perplexity") for k in keys if k.startswith("perplexity")]  # "" or "_top", "_bottom", ...
    if levels:
        fig, ax1 = plt.subplots(figsize=(5, 3.2))
        ax2 = ax1.twinx()
        for level, style in zip(levels, ("-", "--", ":", "-.")):
            name = level.lstrip("_")
            ax1.plot(epochs, [r.get(f"perplexity{level}", np.nan) for r in history], color="tab:blue", ls=style, marker="o", ms=3, label=name or None)
            ax2.plot(epochs, [100 * r.get(f"codes_used{level}", np.nan) for r in history], color="tab:orange", ls=style, marker="s", ms=3)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("code perplexity", color="tab:blue")
        ax2.set_ylabel("codes used (%)", color="tab:orange")
        ax2.set_ylim(0, 105)
        ax1.grid(alpha=0.3)
        if any(levels):
            ax1.legend(title="level", fontsize=7)
        _save(fig, Path(plots_dir) / "codebook.png")

    ssim_keys = [k for k in keys if k.endswith("_ssim")]
    if ssim_keys:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in ssim_keys:
            label = {"train_ssim": "train", "val_ssim": "validation"}.get(key, key)
            ax.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("SSIM (data range 1)")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, Path(plots_dir) / "ssim.png")


@lru_cache(maxsize=8)
def _colour_table(cmap: str) -> tuple[np.ndarray, np.ndarray]:
    """A colour map's N colours and its colour for NaN ('bad') as rows of uint8 RGB and of float32 RGB / 255."""
    colours = colormaps[cmap]
    rgba = np.concatenate([colours(np.arange(colours.N)), [colours.get_bad()]])
    table = (rgba[:, :3] * 255).astype(np.uint8)
    return table, table.astype(np.float32) / 255


def _scaled(map_: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    return np.clip((map_ - vmin) / max(vmax - vmin, 1e-12), 0, 1)


def _colour_index(scaled: np.ndarray, n: int) -> np.ndarray:
    """Row of the colour table for each value in [0, 1] (NaN: the last row), as matplotlib's colour maps pick it."""
    with np.errstate(invalid="ignore"):  # NaN: replaced below
        index = np.minimum((scaled * n).astype(np.intp), n - 1)
    nan = np.isnan(scaled)
    if nan.any():
        index[nan] = n
    return index


def colorize(map_: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 through a colour map with fixed limits (not per image); the colours of
    matplotlib's colour map, looked up in its table of N colours."""
    table, _ = _colour_table(cmap)
    return table[_colour_index(_scaled(map_, vmin, vmax), len(table) - 1)]


def overlay(image: np.ndarray, map_: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Grayscale (H, W) in [0, 1] with a colour map blended where the map exceeds vmin. -> uint8 RGB."""
    _, table = _colour_table(cmap)
    scaled = _scaled(map_, vmin, vmax)
    index = _colour_index(scaled, len(table) - 1)
    weight = alpha * scaled
    base = (1 - weight) * np.clip(image, 0, 1)
    out = np.empty((*scaled.shape, 3), np.uint8)
    for c in range(3):  # (1 - weight) * gray + weight * colour, one whole (H, W) plane per channel
        blend = weight * np.take(table[:, c], index) + base
        np.clip(blend, 0, 1, out=blend)
        blend *= 255
        out[..., c] = blend  # truncated to uint8, as astype
    return out


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes: every row 'Up'-filtered (its difference from the row above, one
    numpy subtraction) and deflated by zlib at ``level``. Pillow chooses a filter row by row, trying all
    five, which took as long as the deflating itself on an overlay; the fixed filter encodes a 1137x567
    overlay in about 60 % of Pillow's time at level 1, in a file 8 % larger."""
    import struct
    import zlib

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 0] = 0  # the first row has no row above: None
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG's Up filter

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)) + chunk(b"IEND", b"")


def save_image_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, cmap: Sequence[str] | None = None, vmax: Sequence[float] | None = None) -> None:
    """rows: (label, (N, H, W) array); one row per entry, one column per image."""
    n = max(len(a) for _, a in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows)), squeeze=False)
    for r, (label, arrays) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(arrays):
                ax.imshow(arrays[c], cmap=(cmap[r] if cmap else "gray"), vmin=0, vmax=(vmax[r] if vmax else 1))
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.subplots_adjust(wspace=0.02, hspace=0.15)
    _save(fig, path)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path, title: str = "") -> None:
    """curves: name -> (fpr, tpr, auroc)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _wrap(line: str, font, width: int) -> list[str]:
    """Break a caption line at spaces so that each piece fits ``width`` pixels."""
    if font.getlength(line) <= width:
        return [line]
    out, current = [], ""
    for word in line.split(" "):
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            out.append(current)
            current = word
        else:
            current = trial
    return out + [current]


@lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _cross_step(mask: np.ndarray, erode: bool) -> np.ndarray:
    """One binary erosion (or dilation) by the 3x3 cross, outside the array counting as False: as
    ``scipy.ndimage.binary_erosion`` / ``binary_dilation`` with their default structure, by shifted ANDs / ORs."""
    out = mask.copy()
    combine = np.logical_and if erode else np.logical_or
    for axis in (0, 1):
        n = mask.shape[axis]
        if n < 2:
            if erode:
                out[:] = False
            continue
        lead = [slice(None)] * 2
        lag = [slice(None)] * 2
        lead[axis], lag[axis] = slice(1, None), slice(None, -1)
        combine(out[tuple(lag)], mask[tuple(lead)], out=out[tuple(lag)])  # each pixel with the one after it
        combine(out[tuple(lead)], mask[tuple(lag)], out=out[tuple(lead)])  # and with the one before it
        if erode:  # the first and last rows (columns) have a False neighbour outside
            edge = [slice(None)] * 2
            for i in (0, n - 1):
                edge[axis] = i
                out[tuple(edge)] = False
    return out


def annotated_overlay(
    image: np.ndarray,
    map_: np.ndarray,
    vmin: float,
    vmax: float,
    caption: Sequence[str],
    *,
    threshold: float | None = None,
    contour: bool = False,
    cmap: str = "jet",
) -> np.ndarray:
    """An overlay a reader can interpret: the map blended over the scan, a colour bar in calibrated units
    with the threshold marked, optionally the outline where the map crosses ``threshold``, and a caption
    strip below (one line per entry of ``caption``). (H, W) in -> (H + caption, W + bar, 3) uint8 out."""
    from PIL import Image, ImageDraw

    height, width = map_.shape
    body = overlay(image, map_, vmin, vmax, cmap=cmap)
    if contour and threshold is not None:
        inside = map_ >= threshold
        edge = inside & ~_cross_step(inside, erode=True)
        for _ in range(max(1, round(max(height, width) / 400))):  # ~1 px per 400 px of scan
            edge = _cross_step(edge, erode=False)
        body[edge] = (255, 255, 255)
    text = max(11, round(height / 32))
    font = _font(text)
    bar_w, label_w = max(12, width // 40), 5 * text
    line_h = round(text * 1.3)
    total_w = width + bar_w + label_w + 8
    lines = [part for line in caption for part in _wrap(line, font, total_w - 8)]
    canvas = Image.new("RGB", (total_w, height + line_h * len(lines) + 8), "white")
    canvas.paste(Image.fromarray(body), (0, 0))
    # colour bar: vmax at the top, vmin at the bottom, one row per pixel of the scan's height
    levels = np.linspace(vmax, vmin, height)[:, None].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(colorize(levels, vmin, vmax, cmap)), (width + 4, 0))
    draw = ImageDraw.Draw(canvas)
    x_text = width + bar_w + 7
    row_of = lambda v: int(round((vmax - v) / max(vmax - vmin, 1e-12) * (height - 1)))
    labels = [(0, f"{vmax:.3g}"), (height - text - 2, f"{vmin:.3g}")]
    if threshold is not None and vmin <= threshold <= vmax:
        y = row_of(threshold)
        draw.line([(width + 2, y), (width + bar_w + 5, y)], fill="black", width=2)
        y_label = min(max(y - text // 2, 0), height - text - 2)
        labels = [(yy, t) for yy, t in labels if abs(yy - y_label) > text] + [(y_label, f"{threshold:.3g}")]
    for y, label in labels:
        draw.text((x_text, y), label, fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((4, height + 4 + i * line_h), line, fill="black", font=font)
    return np.asarray(canvas)
