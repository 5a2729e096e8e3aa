"""Image readers, chosen by file suffix. Every reader returns a float32 (H, W) array in [0, 1].

- PNG / JPEG / BMP (Pillow): 8-bit scaled by 255, colour converted to luminance.
- 16-bit PNG and integer TIFF: scaled by the bit depth the file states (a PNG's sBIT chunk, a TIFF's
  MaxSampleValue tag); without one, by the smallest of 8, 10, 12, 14 and 16 bits that holds the data
  (12-bit scanner data stored in 16-bit files is common, and dividing it by 65535 would darken it 16-fold).
  Which depth was used is said once per depth (a warning). TIFF floats are min-max scaled to [0, 1]; the
  first page and first channel of multi-page / multi-channel files are read.
- DICOM (pydicom): rescale slope/intercept applied, MONOCHROME1 inverted, scaled by the stored bit depth.
- NIfTI slices (nibabel, ``medvq.data.nifti``): percentile-clipped per volume or per slice.
- Images above MAX_PIXELS (64 megapixels; OCT B-scans have under 1) are refused before decoding.
- B-scans of OCT volumes (DICOM multi-frame, Heidelberg .vol, Zeiss .img: ``medvq.data.volumes``).

``read_sample`` is the one entry point of training, evaluation and inference: a ``Sample`` (file, and the
slice for a volume) in, float32 (H, W) in [0, 1] out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from medvq.data import nifti, volumes
from medvq.data.nifti import VolumeOptions
from medvq.data.sample import Sample
from medvq.errors import ImageReadError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES | DICOM_SUFFIXES


MAX_PIXELS = 64_000_000  # refused before decoding: a small file can declare a huge image (and its maps would take GBs)
BIT_DEPTHS = (8, 10, 12, 14, 16)


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), above medvq's limit of {MAX_PIXELS / 1e6:.0f}",
            path=path,
            fix="downsample or crop it first",
        )


def _bits_from_data(array: np.ndarray, stated: int | None, path: Path, container: int) -> int:
    """The bit depth to scale integer pixels by: the file's statement, else the smallest that holds the data."""
    import warnings

    if stated and array.max(initial=0) <= 2**stated - 1:
        return stated
    top = float(array.max(initial=0))
    bits = next(b for b in BIT_DEPTHS if top <= 2**b - 1) if top <= 2**16 - 1 else int(np.ceil(np.log2(top + 1)))
    if bits != container:
        warnings.warn(f"{container}-bit images without a stated bit depth (e.g. {path.name}) are scaled as {bits}-bit data (maximum {2**bits - 1})", stacklevel=3)
    return bits


def _png_significant_bits(path: Path) -> int | None:
    """The sBIT chunk of a grayscale PNG (bits that carry data), read from the chunks before the image data."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            body = f.read(length)
            f.read(4)  # CRC
            if kind == b"sBIT" and body:
                return int(body[0]) or None


def _scale_integer(array: np.ndarray, bits: int | None = None) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        top = (2**bits - 1) if bits else np.iinfo(array.dtype).max
        return array.astype(np.float32) / float(top)
    return _scale_float(array)


def _scale_float(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.any():
        raise ValueError("no finite pixel values")
    low, high = float(array[finite].min()), float(array[finite].max())
    array = np.where(finite, array, low)
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _to_gray(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        if array.shape[-1] in (3, 4):  # RGB(A), channels last
            rgb = array[..., :3].astype(np.float32)
            return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return array[0]  # first page / channel
    return array


def read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        _check_size(path, *im.size)
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(im)
            if array.min(initial=0) < 0:
                return _scale_float(array)
            stated = _png_significant_bits(path) if im.format == "PNG" else None
            bits = _bits_from_data(array.astype(np.uint32), stated, path, container=16 if im.mode.startswith("I;16") else 32)
            return np.clip(array.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
        if im.mode == "F":
            return _scale_float(np.asarray(im))
        if im.mode == "L":  # 8-bit gray (OCT JPEGs): divided by 255 in place, 1.6x faster than a table look-up
            array = np.asarray(im).astype(np.float32)
            return np.divide(array, np.float32(255), out=array)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        _check_size(path, int(page.imagewidth), int(page.imagelength))
        array = page.asarray()
        tag = page.tags.get(281)  # MaxSampleValue
        stated = int(np.max(tag.value)).bit_length() if tag is not None and np.max(tag.value) > 0 else None
    while array.ndim > 2:
        array = _to_gray(array)
    if np.issubdtype(array.dtype, np.unsignedinteger) and array.dtype.itemsize >= 2:
        return array.astype(np.float32) / float(2 ** _bits_from_data(array, stated, path, container=array.dtype.itemsize * 8) - 1)
    return _scale_integer(array)


def read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    _check_size(path, int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0))
    array = ds.pixel_array
    while array.ndim > 2:
        array = _to_gray(array)
    array = array.astype(np.float32)
    slope, intercept = float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))
    if slope != 1.0 or intercept != 0.0:
        array = _scale_float(array * slope + intercept)
    else:
        bits = int(getattr(ds, "BitsStored", 0) or 0)
        array = array / float(2**bits - 1) if bits and array.max() <= 2**bits - 1 and array.min() >= 0 else _scale_float(array)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        array = 1.0 - array
    return array.astype(np.float32)


READERS: dict[str, Callable[[Path], np.ndarray]] = {
    **{s: read_pil for s in PIL_SUFFIXES},
    **{s: read_tiff for s in TIFF_SUFFIXES},
    **{s: read_dicom for s in DICOM_SUFFIXES},
}


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """Read one grayscale image as float32 (H, W) in [0, 1]; raise ImageReadError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError("file not found", path=path)
    if not path.is_file():
        raise ImageReadError("not a file", path=path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ImageReadError(
            f"unsupported file type '{path.suffix}'", path=path, fix=f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if path.stat().st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path=path, fix="remove it or replace it with the real image")
    try:
        array = reader(path)
    except ImageReadError:
        raise
    except Exception as err:  # every library raises its own types; the user needs the file name
        raise ImageReadError(f"cannot read image: {err.__class__.__name__}: {err}", path=path, fix="is the file complete and of the type its suffix says?") from err
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageReadError(f"no 2D pixel data (shape {array.shape})", path=path)
    if min(array.shape) < 8:
        raise ImageReadError(f"image too small ({array.shape[1]}x{array.shape[0]} px)", path=path)
    return np.ascontiguousarray(array, dtype=np.float32)


def read_sample(sample: Sample, volume: VolumeOptions | None = None) -> np.ndarray:
    """Read what a sample points at: a B-scan of an OCT volume, a NIfTI slice (normalised with ``volume``) or an image file."""
    if sample.frame is not None and not nifti.is_nifti(sample.path):
        return volumes.read_bscan(sample.path, sample.frame)
    if sample.frame is not None or nifti.is_nifti(sample.path):
        return nifti.read_nifti(sample.path, sample.frame, volume or nifti.VolumeOptions())
    return read_image(sample.path)


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A lesion mask (any nonzero pixel = lesion) that must match its image's shape."""
    mask = read_image(path) > 0
    if mask.shape != tuple(shape):
        raise ImageReadError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}", path=path)
    return mask
