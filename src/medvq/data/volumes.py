"""OCT volumes: one file per eye and visit, read as a stack of B-scans with the metadata it carries.

Formats and the readers behind them
- DICOM Ophthalmic Tomography (any number of frames) and other DICOM with more than one frame (``.dcm``):
  pydicom; a one-frame DICOM of another kind stays a 2D image. Patient =
  PatientID; eye = ImageLaterality, Laterality or the shared FrameLaterality; date = AcquisitionDateTime,
  ContentDate or StudyDate; B-scan spacing = the shared pixel measures' SpacingBetweenSlices or
  SliceThickness. Frames scaled like 2D DICOM (rescale slope/intercept, bit depth, MONOCHROME1).
- Heidelberg Spectralis ``.vol``: eyepy (``pip install medvq[oct-vendors]``). Patient, eye (scan
  position), visit date and B-scan distance from the file header; intensities shown through eyepy's
  HEYEX display mapping (``from_vol_intensity``, a logarithm of the stored reflectivity), missing values 0.
- Topcon ``.fda``: oct-converter (same extra). Patient, eye and capture date from the file's
  information chunks, B-scan spacing from its scan parameters; JPEG or raw 16-bit B-scans.
- Zeiss Cirrus ``.img`` (raw cube): oct-converter (same extra). The file holds no header: the A-scan and
  B-scan counts come from the exported name (``..._Macular Cube 512x128_...``), patient (``P<digits>``),
  eye and date from the name as well, as oct-converter reads them.

Every B-scan becomes a ``Sample`` with ``frame`` = its index in the file. Files that cannot be read (not
the format, truncated, no B-scans) raise one :class:`~medvq.errors.ImageReadError` naming the file; a
B-scan that cannot be decoded (a damaged compressed DICOM frame) or holds no image content (every pixel
missing or equal, e.g. a frame the scanner left empty) is skipped with a warning that names the file and
the frame, and the other B-scans are kept.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from medvq.data.sample import Sample
from medvq.errors import ImageReadError

EYE_CODES = {"R": "OD", "OD": "OD", "L": "OS", "OS": "OS"}
OPTIONAL_EXTRA = "pip install 'medvq[oct-vendors]'"


@dataclass(frozen=True)
class OCTVolume:
    """The B-scans of one file as float32 (N, H, W) in [0, 1] and what the file says about them."""

    bscans: np.ndarray
    patient_id: str = ""
    eye: str = ""  # OD | OS | ""
    scan_date: str = ""  # ISO date, "" when absent
    spacing_mm: float | None = None  # distance between neighbouring B-scans
    usable: tuple[bool, ...] = ()  # per B-scan: False where it holds no image
    unreadable: dict[int, str] = field(default_factory=dict)  # B-scans a reader could not decode -> why

    @property
    def n_bscans(self) -> int:
        return len(self.bscans)


# --- formats ------------------------------------------------------------------------------------
OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # SOP class of DICOM OCT volumes


def _dicom_is_volume(path: Path) -> bool:
    """Several frames, or an Ophthalmic Tomography image (a volume even of one B-scan)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return False  # not readable as DICOM: the 2D reader says why
    return int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or str(getattr(ds, "SOPClassUID", "")) == OPHTHALMIC_TOMOGRAPHY


def _first(ds, *names: str) -> str:
    for name in names:
        value = getattr(ds, name, None)
        if value not in (None, ""):
            return str(value)
    return ""


def _shared(ds, sequence: str, name: str):
    try:
        return getattr(getattr(ds.SharedFunctionalGroupsSequence[0], sequence)[0], name, None)
    except (AttributeError, IndexError):
        return None


def _dicom_date(text: str) -> str:
    text = text.strip()[:8]
    try:
        return datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def read_dicom_volume(path: Path) -> OCTVolume:
    import pydicom

    ds = pydicom.dcmread(path)
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    unreadable: dict[int, str] = {}
    try:
        frames = ds.pixel_array  # (N, H, W[, samples]); one frame comes without the N axis
    except Exception:
        if n == 1:
            raise
        frames, unreadable = _dicom_frames_one_by_one(ds, n)  # compressed frames: keep those that decode
    if n == 1:
        frames = frames[None]
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:  # colour frames -> luminance
        frames = frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    frames = frames.astype(np.float32)
    slope, intercept = float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))
    bits = int(getattr(ds, "BitsStored", 0) or 0)
    if slope != 1.0 or intercept != 0.0 or not bits:
        frames = frames * slope + intercept
        low, high = float(frames.min()), float(frames.max())
        frames = (frames - low) / (high - low) if high > low else np.zeros_like(frames)
    else:
        frames = frames / float(2**bits - 1)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        frames = 1.0 - frames
    eye = _first(ds, "ImageLaterality", "Laterality") or str(_shared(ds, "FrameAnatomySequence", "FrameLaterality") or "")
    spacing = _shared(ds, "PixelMeasuresSequence", "SpacingBetweenSlices") or _shared(ds, "PixelMeasuresSequence", "SliceThickness")
    return OCTVolume(
        bscans=np.clip(frames, 0, 1),
        patient_id=_first(ds, "PatientID"),
        eye=EYE_CODES.get(eye.upper(), ""),
        scan_date=_dicom_date(_first(ds, "AcquisitionDateTime", "ContentDate", "StudyDate")),
        spacing_mm=float(spacing) if spacing else None,
        unreadable=unreadable,
    )


def _dicom_frames_one_by_one(ds, n: int) -> tuple[np.ndarray, dict[int, str]]:
    """Decode each frame on its own; frames that fail are zero-filled and reported (all failing: raise)."""
    from pydicom.pixels import pixel_array

    decoded: list[np.ndarray | None] = []
    unreadable: dict[int, str] = {}
    for i in range(n):
        try:
            decoded.append(pixel_array(ds, index=i))
        except Exception as err:
            decoded.append(None)
            unreadable[i] = f"cannot be decoded ({str(err).splitlines()[-1].strip()})"
    good = [d for d in decoded if d is not None]
    if not good:
        raise ValueError(f"none of its {n} frames can be decoded ({next(iter(unreadable.values()))})")
    return np.stack([d if d is not None else np.zeros_like(good[0]) for d in decoded]), unreadable


def _vendor_library(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"reading this format needs {name.split('.')[0]} ({OPTIONAL_EXTRA})") from None


def read_heidelberg_vol(path: Path) -> OCTVolume:
    he = _vendor_library("eyepy.io.he.vol_reader")
    utils = _vendor_library("eyepy.core.utils")
    parsed = he.HeVolReader(path).parsed_file
    if parsed.n_bscans < 1:
        raise ValueError("the header lists no B-scans")
    bscans = []
    for b in parsed.bscans:
        raw = np.array(b.data, dtype=np.float32)  # stored reflectivity; float32 max marks missing values
        bscans.append(utils.from_vol_intensity(raw).astype(np.float32) / 255.0)
    visit = parsed.visit_date
    return OCTVolume(
        bscans=np.stack(bscans),
        patient_id=str(parsed.patient_id).strip("\x00 "),
        eye=EYE_CODES.get(str(parsed.scan_position).strip("\x00 ").upper(), ""),
        scan_date=_iso_date(visit),
        spacing_mm=float(parsed.distance) if parsed.distance > 0 else None,
    )


def _iso_date(value) -> str:
    """A date from eyepy's header fields (a datetime, a date or an ISO string) as YYYY-MM-DD."""
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)[:10] if re.match(r"\d{4}-\d{2}-\d{2}", str(value)) else ""


ZEISS_CUBE = re.compile(r"(?P<ascans>\d+)x(?P<bscans>\d+)")


def read_zeiss_img(path: Path) -> OCTVolume:
    img = _vendor_library("oct_converter.readers.img")
    match = ZEISS_CUBE.search(path.name)
    if not match:
        raise ValueError("the B-scan size is not in the name (a Zeiss export is named like '..._Macular Cube 512x128_...img')")
    cols, n = int(match.group("ascans")), int(match.group("bscans"))
    size = path.stat().st_size
    if size % (cols * n):
        raise ValueError(f"{size} bytes are not {n} B-scans of {cols} A-scans (truncated?)")
    rows = size // (cols * n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = img.IMG(path).read_oct_volume(rows=rows, cols=cols)
    frames = np.stack([np.asarray(b, dtype=np.float32) / 255.0 for b in volume.volume])
    acquired = volume.acquisition_date
    return OCTVolume(
        bscans=frames,
        patient_id=volume.patient_id or "",
        eye=EYE_CODES.get((volume.laterality or "").upper(), ""),
        scan_date=acquired.date().isoformat() if isinstance(acquired, datetime) else "",
        spacing_mm=None,
    )


@contextlib.contextmanager
def _binary_fromstring():
    """oct-converter 0.7 reads binary fields with ``np.fromstring``, whose binary mode numpy 2.3 removed;
    while its reader runs, that call reads the same bytes with ``np.frombuffer``."""
    original = np.fromstring

    def fromstring(string, dtype=float, count=-1, *, sep="", **kwargs):
        if sep == "":
            return np.frombuffer(string, dtype=dtype, count=count).copy()
        return original(string, dtype=dtype, count=count, sep=sep, **kwargs)

    np.fromstring = fromstring
    try:
        yield
    finally:
        np.fromstring = original


def read_topcon_fda(path: Path) -> OCTVolume:
    fda = _vendor_library("oct_converter.readers.fda")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _binary_fromstring():  # the reader prints and warns about chunks it skips
        warnings.simplefilter("ignore")
        volume = fda.FDA(path).read_oct_volume()
    if not volume.volume:
        raise ValueError("no OCT B-scans in the file (neither @IMG_JPEG nor @IMG_MOT_COMP_03)")
    frames = np.stack([_gray(np.asarray(b)) for b in volume.volume])
    if np.issubdtype(frames.dtype, np.integer):
        frames = frames.astype(np.float32) / float(np.iinfo(frames.dtype).max)
    acquired = volume.acquisition_date
    spacing = volume.pixel_spacing[1] if volume.pixel_spacing else None  # [A-scan width, B-scan spacing, depth] in mm
    return OCTVolume(
        bscans=frames.astype(np.float32),
        patient_id=(volume.patient_id or "").strip("\x00 "),
        eye=EYE_CODES.get((volume.laterality or "").upper(), ""),
        scan_date=acquired.date().isoformat() if isinstance(acquired, datetime) else "",
        spacing_mm=float(spacing) if spacing else None,
    )


def _gray(b: np.ndarray) -> np.ndarray:
    return b[..., 0] if b.ndim == 3 else b


@dataclass(frozen=True)
class VolumeFormat:
    name: str
    suffixes: tuple[str, ...]
    read: Callable[[Path], OCTVolume]
    holds_volume: Callable[[Path], bool] = lambda path: True  # e.g. a DICOM file only with several frames


FORMATS = (
    VolumeFormat("DICOM multi-frame", (".dcm", ".dicom"), read_dicom_volume, _dicom_is_volume),
    VolumeFormat("Heidelberg .vol", (".vol",), read_heidelberg_vol),
    VolumeFormat("Zeiss .img", (".img",), read_zeiss_img),
    VolumeFormat("Topcon .fda", (".fda",), read_topcon_fda),
)
VOLUME_SUFFIXES = {s for f in FORMATS for s in f.suffixes}


def volume_format(path: str | Path) -> VolumeFormat | None:
    """The format of an OCT volume file, or None for anything else (a 2D image, a one-frame DICOM that is not OCT)."""
    path = Path(path)
    if path.name.startswith(".") or not path.is_file():
        return None
    for fmt in FORMATS:
        if path.suffix.lower() in fmt.suffixes and fmt.holds_volume(path):
            return fmt
    return None


def is_oct_volume(path: str | Path) -> bool:
    return volume_format(path) is not None


# --- reading ------------------------------------------------------------------------------------
def _check_bscans(volume: OCTVolume, path: Path) -> OCTVolume:
    usable = []
    for i, b in enumerate(volume.bscans):
        finite = np.isfinite(b)
        ok = i not in volume.unreadable and bool(finite.any()) and float(b[finite].max()) > float(b[finite].min())
        if not ok:
            why = volume.unreadable.get(i, "it holds no image (every pixel missing or equal)")
            warnings.warn(f"{path}: B-scan {i} skipped: {why}", stacklevel=2)
        usable.append(ok)
    if not any(usable):
        raise ImageReadError("no B-scan holds an image", path=path, fix="the file is empty or damaged; export it again")
    bscans = np.where(np.isfinite(volume.bscans), volume.bscans, 0.0).astype(np.float32)
    return OCTVolume(bscans, volume.patient_id, volume.eye, volume.scan_date, volume.spacing_mm, tuple(usable), volume.unreadable)


@lru_cache(maxsize=2)
def _load(path_str: str, mtime_ns: int, size: int) -> OCTVolume:
    path = Path(path_str)
    fmt = volume_format(path)
    if fmt is None:
        raise ImageReadError("not an OCT volume file", path=path, fix=f"volumes: {', '.join(f.name for f in FORMATS)}")
    if size == 0:
        raise ImageReadError("empty file (0 bytes)", path=path, fix="remove it or export the volume again")
    try:
        volume = fmt.read(path)
    except ImportError as err:
        raise ImageReadError(str(err), path=path, fix=OPTIONAL_EXTRA) from None
    except Exception as err:  # each library raises its own types; the user needs the file name
        raise ImageReadError(
            f"cannot read {fmt.name} volume: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            path=path,
            fix="is the file complete (not truncated) and of the type its suffix says?",
        ) from err
    if volume.bscans.ndim != 3 or volume.n_bscans < 1 or min(volume.bscans.shape[1:]) < 8:
        raise ImageReadError(f"no B-scans of at least 8x8 px (shape {volume.bscans.shape})", path=path)
    return _check_bscans(volume, path)


def load_volume(path: str | Path) -> OCTVolume:
    """The volume in a file, read once and kept while its B-scans are being used (two files at most)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError("file not found" if not path.exists() else "not a file", path=path)
    st = path.stat()
    return _load(str(path.resolve()), st.st_mtime_ns, st.st_size)


def read_bscan(path: str | Path, frame: int) -> np.ndarray:
    """B-scan ``frame`` of a volume file as float32 (H, W) in [0, 1]."""
    volume = load_volume(path)
    if not 0 <= frame < volume.n_bscans:
        raise ImageReadError(f"B-scan {frame} does not exist ({volume.n_bscans} B-scans)", path=path, fix="was the file replaced after it was listed?")
    return np.ascontiguousarray(volume.bscans[frame])


def scan_volume_file(path: str | Path, *, label: str = "", split: str | None = None) -> list:
    """One sample per usable B-scan of a volume file, with patient, eye and scan date from its metadata."""
    path = Path(path)
    volume = load_volume(path)
    spacing = volume.spacing_mm or 0.0
    return [
        Sample(
            path=path,
            label=label,
            patient_id=volume.patient_id,
            split=split,
            frame=i,
            eye=volume.eye,
            visit=volume.scan_date,
            meta={"volume": 0, "slice": i, "position_mm": i * spacing, "n_bscans": volume.n_bscans},
        )
        for i in range(volume.n_bscans)
        if volume.usable[i]
    ]
