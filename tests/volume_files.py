"""Writers of real OCT volume files for tests and the reading benchmark.

- DICOM Ophthalmic Tomography multi-frame, written with pydicom (the IOD's patient, laterality, dates and
  shared pixel measures);
- Heidelberg Spectralis .vol, byte by byte from the published layout (a 2048-byte file header, the SLO
  image, then per B-scan a header of ``bscan_hdr_size`` bytes followed by float32 reflectivities);
- Zeiss Cirrus .img: the raw uint8 cube (depth x A-scans x B-scans, first axis fastest) with the
  metadata in the exported file name.
"""

from __future__ import annotations

import datetime
import struct
from pathlib import Path

import numpy as np

VOL_MISSING = np.finfo(np.float32).max  # Heidelberg's marker of a missing value


def write_dicom_opt(
    path: Path, frames: np.ndarray, *, patient: str = "P001", laterality: str = "R", spacing_mm: float = 0.12, study_date: str = "20240105", sop_class: str | None = None
) -> Path:
    """frames: (N, H, W) uint8 or uint16 B-scans; ``sop_class`` replaces Ophthalmic Tomography (e.g. Secondary Capture)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    opt = sop_class or "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = opt
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = opt, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OPT"
    ds.PatientID, ds.PatientName = patient, "Test^Patient"
    if study_date:  # "" leaves the dates out
        ds.StudyDate = ds.ContentDate = study_date
        ds.AcquisitionDateTime = study_date + "101500"
    ds.ImageLaterality = laterality
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if frames.dtype == np.uint8 else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    measures = Dataset()
    measures.PixelSpacing = [0.0039, 0.0115]
    measures.SliceThickness = spacing_mm
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_heidelberg_vol(path: Path, bscans: np.ndarray, *, patient: str = "PAT-7", eye: str = "OS", distance_mm: float = 0.24, visit: datetime.date = datetime.date(2023, 3, 14)) -> Path:
    """bscans: (N, H, W) float32 reflectivities in [0, 1] (VOL_MISSING where the scanner has no value)."""
    n, size_y, size_x = bscans.shape
    slo_w = slo_h = 16
    bscan_hdr_size = 256
    visit_days = (visit - datetime.date(1899, 12, 30)).days  # dates: days since 1899-12-30 as float64
    header = struct.pack(
        "<12sIII3dII2dId4sQiI16s16sI24sdI24sdIIII34s1790x",
        b"HSF-OCT-103", size_x, n, size_y,
        0.0115, distance_mm, 0.0039,  # scale_x, distance, scale_y (mm)
        slo_w, slo_h, 0.03, 0.03, 30, 0.0,  # SLO size, SLO scale, field size, scan focus
        eye.encode().ljust(4, b"\0"), 0, 3, bscan_hdr_size,  # scan position, exam time, pattern 3 = volume, B-scan header size
        b"1234", b"", 7, patient.encode(), 20000.0, 1, b"#1", float(visit_days),
        0, 0, 0, 0, b"",
    )  # fmt: skip
    assert len(header) == 2048, len(header)
    parts = [header, np.zeros(slo_w * slo_h, np.uint8).tobytes()]
    for b in bscans:
        bscan_header = struct.pack("<12sI4dIIfI6f168x", b"HSF-BS-103", bscan_hdr_size, 0.0, 0.0, 6.0, 0.0, 0, 256, 30.0, 0, *([0.0] * 6))
        assert len(bscan_header) == 256
        parts += [bscan_header, np.ascontiguousarray(b, dtype="<f4").tobytes()]
    path.write_bytes(b"".join(parts))
    return path


def write_zeiss_img(folder: Path, cube: np.ndarray, *, patient: str = "P12345", eye: str = "OD") -> Path:
    """cube: (N, depth, A-scans) uint8 B-scans; named the way Cirrus exports a macular cube."""
    n, depth, ascans = cube.shape
    path = folder / f"{patient}_Macular Cube {ascans}x{n}_7-25-2016_14-35-22_{eye}_sn1234_cube_z.img"
    path.write_bytes(np.ascontiguousarray(cube.transpose(1, 2, 0)).tobytes(order="F"))
    return path


def _fda_chunk(name: bytes, data: bytes) -> bytes:
    return struct.pack("<B", len(name)) + name + struct.pack("<I", len(data)) + data


def write_topcon_fda(path: Path, bscans: np.ndarray, *, patient: str = "TP-19", eye: str = "L", width_mm: float = 6.0, height_mm: float = 6.0, quality: int = 95) -> Path:
    """bscans: (N, H, W) uint8. Topcon .fda as the published chunk layout has it: a 15-byte header ("FOCT",
    "FDA", two uint32 versions), then chunks of [name length u8][name][size u32][data] and a 0 byte; B-scans
    are JPEGs in @IMG_JPEG after a 25-byte header; patient in @PATIENT_INFO_02, eye (0 R, 1 L) and capture
    date in @CAPTURE_INFO_02, scan size in mm in @PARAM_SCAN_04."""
    import io

    from PIL import Image

    n, h, w = bscans.shape
    jpegs = b""
    for b in bscans:
        buffer = io.BytesIO()
        Image.fromarray(b).save(buffer, format="JPEG", quality=quality)
        jpegs += struct.pack("<i", buffer.tell()) + buffer.getvalue()
    image = struct.pack("<B6I", 3, 0, 0, w, h, n, 0) + jpegs  # scan mode, 2 x unknown, width, height, B-scans, unknown
    patient_info = patient.encode().ljust(32, b"\0") + b"Test".ljust(32, b"\0") + b"Patient".ljust(32, b"\0") + bytes(8) + b"\x02" + struct.pack("<3H", 1950, 5, 17)
    patient_info = patient_info.ljust(615, b"\0")
    capture = struct.pack("<BBI100s6H", {"R": 0, "L": 1}[eye], 3, 1, b"Macula 3D", 2022, 11, 3, 9, 30, 0)
    scan = struct.pack("<3I5d2B", 0, 0, 0, width_mm, height_mm, 2.6, 0.0, 0.0, 0, 0)
    body = b"".join(_fda_chunk(name, data) for name, data in ((b"@PATIENT_INFO_02", patient_info), (b"@CAPTURE_INFO_02", capture), (b"@PARAM_SCAN_04", scan), (b"@IMG_JPEG", image)))
    path.write_bytes(b"FOCT" + b"FDA" + struct.pack("<II", 1, 3) + body + b"\0")
    return path


def write_dicom_opt_jpeg(path: Path, frames: np.ndarray, *, damaged: tuple[int, ...] = (), **kwargs) -> Path:
    """A DICOM OPT multi-frame file whose frames are JPEG baseline (encapsulated pixel data, as many devices
    export); the frames in ``damaged`` are cut short, as a failed transfer leaves them."""
    import io

    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    write_dicom_opt(path, frames, **kwargs)
    ds = pydicom.dcmread(path)
    encoded = []
    for i, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        encoded.append(data[: len(data) // 3] if i in damaged else data)
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path
