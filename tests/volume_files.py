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
