import numpy as np
import pytest
from PIL import Image

from medvq.data.readers import read_image
from medvq.errors import ImageReadError


def _ramp(h=40, w=50):
    return np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)


def test_png_8_and_16_bit(tmp_path):
    ramp = _ramp()
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "b.png")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert a.dtype == np.float32 and a.shape == (40, 50)
    np.testing.assert_allclose(a, ramp, atol=1 / 255)
    np.testing.assert_allclose(b, ramp, atol=1e-4)


def test_jpeg_rgb_becomes_gray(tmp_path):
    rgb = np.stack([(_ramp() * 255).astype(np.uint8)] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.jpeg", quality=98)
    out = read_image(tmp_path / "c.jpeg")
    assert out.shape == (40, 50) and 0 <= out.min() and out.max() <= 1
    np.testing.assert_allclose(out, _ramp(), atol=0.03)


def test_tiff_16_bit_and_float(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "d.tif", (_ramp() * 65535).astype(np.uint16))
    tifffile.imwrite(tmp_path / "e.tiff", _ramp() * 1000 - 200)
    np.testing.assert_allclose(read_image(tmp_path / "d.tif"), _ramp(), atol=1e-4)
    np.testing.assert_allclose(read_image(tmp_path / "e.tiff"), _ramp(), atol=1e-5)


def test_dicom_12_bit_monochrome2(tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = (_ramp() * 4095).round().astype(np.uint16)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    np.testing.assert_allclose(read_image(tmp_path / "f.dcm"), _ramp(), atol=1e-3)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jpeg", b"", "empty file"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "cannot read image"),
        ("notes.txt", b"hello", "unsupported file type"),
    ],
)
def test_bad_files_named_in_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)
    assert name in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "gone.png")
