"""OCT volume files (DICOM OPT multi-frame, Heidelberg .vol, Zeiss .img) read as B-scans with their metadata."""

from __future__ import annotations

import numpy as np
import pytest
from volume_files import VOL_MISSING, write_dicom_opt, write_dicom_opt_jpeg, write_heidelberg_vol, write_topcon_fda, write_zeiss_img

from medvq.data import volumes
from medvq.data.readers import read_sample
from medvq.data.samples import collect_images, dataset_splits, scan_dataset
from medvq.errors import ImageReadError

RNG = np.random.default_rng(0)


def _frames(n=4, h=40, w=32, dtype=np.uint8):
    top = np.iinfo(dtype).max
    return (RNG.random((n, h, w)) * top).astype(dtype)


def test_dicom_opt_multiframe_is_a_stack_of_bscans_with_patient_and_eye(tmp_path):
    frames = _frames(5, dtype=np.uint16)
    path = write_dicom_opt(tmp_path / "eye.dcm", frames, patient="P042", laterality="L", spacing_mm=0.06, study_date="20240105")
    samples = volumes.scan_volume_file(path, label="NORMAL")
    assert [s.frame for s in samples] == [0, 1, 2, 3, 4]
    assert {(s.patient_id, s.eye, s.visit, s.label) for s in samples} == {("P042", "OS", "2024-01-05", "NORMAL")}
    assert samples[3].meta["position_mm"] == pytest.approx(0.18)
    for s in (samples[0], samples[4]):
        np.testing.assert_allclose(read_sample(s), frames[s.frame] / 65535.0, atol=1e-6)
    assert volumes.is_oct_volume(write_dicom_opt(tmp_path / "one.dcm", frames[:1]))  # OCT: a volume even of one B-scan
    capture = write_dicom_opt(tmp_path / "photo.dcm", frames[:1], sop_class="1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    assert not volumes.is_oct_volume(capture)  # one frame of another kind: an ordinary 2D DICOM image
    assert [s.frame for s in collect_images([tmp_path])] == [0, 1, 2, 3, 4, 0, None]


def test_a_damaged_frame_of_a_compressed_dicom_volume_is_skipped_with_a_warning(tmp_path):
    frames = _frames(4, 64, 48)
    path = write_dicom_opt_jpeg(tmp_path / "jpeg.dcm", frames, damaged=(2,), patient="P7")
    with pytest.warns(UserWarning, match=r"jpeg.dcm: B-scan 2 skipped: cannot be decoded"):
        samples = volumes.scan_volume_file(path)
    assert [s.frame for s in samples] == [0, 1, 3] and {s.patient_id for s in samples} == {"P7"}
    assert np.abs(read_sample(samples[2]) - frames[3] / 255.0).mean() < 0.05  # JPEG: close to the frame written
    broken = write_dicom_opt_jpeg(tmp_path / "broken.dcm", frames, damaged=(0, 1, 2, 3))
    with pytest.raises(ImageReadError, match=r"broken.dcm: cannot read DICOM multi-frame volume: ValueError: none of its 4 frames can be decoded"):
        volumes.scan_volume_file(broken)


def test_heidelberg_vol_through_eyepy_with_a_missing_bscan_skipped(tmp_path):
    from eyepy.core.utils import from_vol_intensity

    bscans = RNG.random((4, 40, 32)).astype(np.float32) ** 3
    bscans[1, :5] = VOL_MISSING  # missing values at the top of one B-scan: still an image
    bscans[2] = VOL_MISSING  # a B-scan with no values at all
    path = write_heidelberg_vol(tmp_path / "scan.vol", bscans, patient="PAT-7", eye="OS", distance_mm=0.24)
    with pytest.warns(UserWarning, match=r"scan.vol: B-scan 2 skipped"):
        samples = volumes.scan_volume_file(path)
    assert [s.frame for s in samples] == [0, 1, 3]
    assert {(s.patient_id, s.eye, s.visit) for s in samples} == {("PAT-7", "OS", "2023-03-14")}
    expected = from_vol_intensity(bscans[1].copy()).astype(np.float32) / 255.0  # HEYEX display mapping
    np.testing.assert_allclose(read_sample(samples[1]), expected, atol=1e-6)
    assert read_sample(samples[1])[:5].max() == 0.0


def test_zeiss_img_cube_through_oct_converter(tmp_path):
    cube = _frames(3, 50, 40)
    path = write_zeiss_img(tmp_path, cube, patient="P12345", eye="OD")
    samples = volumes.scan_volume_file(path, label="CNV")
    assert [s.frame for s in samples] == [0, 1, 2]
    assert {(s.patient_id, s.eye, s.visit) for s in samples} == {("P12345", "OD", "2016-07-25")}
    np.testing.assert_allclose(read_sample(samples[2]), cube[2] / 255.0, atol=1e-6)


def test_topcon_fda_through_oct_converter(tmp_path):
    import io

    from PIL import Image

    before = np.fromstring
    bscans = _frames(3, 64, 48)
    path = write_topcon_fda(tmp_path / "macula.fda", bscans, patient="TP-19", eye="L", height_mm=6.0)
    samples = volumes.scan_volume_file(path)
    assert [s.frame for s in samples] == [0, 1, 2]
    assert {(s.patient_id, s.eye, s.visit) for s in samples} == {("TP-19", "OS", "2022-11-03")}
    assert samples[1].meta["position_mm"] == pytest.approx(2.0)  # 6 mm over 3 B-scans
    buffer = io.BytesIO()
    Image.fromarray(bscans[2]).save(buffer, format="JPEG", quality=95)  # the file holds JPEG B-scans
    np.testing.assert_allclose(read_sample(samples[2]), np.asarray(Image.open(buffer)) / 255.0, atol=1e-6)
    assert np.fromstring is before  # numpy is left as it was after the reader ran


def test_truncated_and_foreign_volume_files_name_the_file(tmp_path):
    dicom = write_dicom_opt(tmp_path / "a.dcm", _frames(6, 64, 64))
    vol = write_heidelberg_vol(tmp_path / "b.vol", RNG.random((3, 40, 32)).astype(np.float32))
    zeiss = write_zeiss_img(tmp_path, _frames(3, 50, 40))
    fda = write_topcon_fda(tmp_path / "d.fda", _frames(3, 64, 48))
    for path in (dicom, vol, zeiss, fda):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        with pytest.raises(ImageReadError) as info:
            volumes.scan_volume_file(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.vol"
    junk.write_bytes(b"not a volume at all" * 10)
    with pytest.raises(ImageReadError, match=r"junk.vol: cannot read Heidelberg .vol volume"):
        collect_images([junk])
    (tmp_path / "empty.vol").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        volumes.load_volume(tmp_path / "empty.vol")


def test_volumes_in_class_folders_and_manifests_split_by_their_patients(tmp_path):
    root = tmp_path / "data"
    for k in range(6):  # six patients, one right-eye volume each, plus a left eye for the first
        (root / "NORMAL").mkdir(parents=True, exist_ok=True)
        write_dicom_opt(root / "NORMAL" / f"vol{k}.dcm", _frames(3), patient=f"P{k}", laterality="R")
    write_dicom_opt(root / "NORMAL" / "vol0-left.dcm", _frames(3), patient="P0", laterality="L")
    samples = scan_dataset(root)
    assert len(samples) == 21 and len({s.patient_id for s in samples}) == 6
    parts = dataset_splits(root, val_fraction=0.2, test_fraction=0.3, seed=0)
    eyes = {p: {(s.path.name, s.frame) for s in parts[p]} for p in parts}
    both = [p for p in parts if any(s.patient_id == "P0" for s in parts[p])]
    assert len(both) == 1 and {"vol0.dcm", "vol0-left.dcm"} <= {n for n, _ in eyes[both[0]]}  # both eyes of a patient together
    manifest = tmp_path / "scans.csv"
    manifest.write_text(f"path,label,patient,eye,frame\n{root}/NORMAL/vol1.dcm,CNV,X1,,\n{root}/NORMAL/vol2.dcm,NORMAL,X2,OS,1\n")
    listed = scan_dataset(manifest)
    assert [(s.patient_id, s.label, s.eye, s.frame) for s in listed] == [("X1", "CNV", "OD", 0), ("X1", "CNV", "OD", 1), ("X1", "CNV", "OD", 2), ("X2", "NORMAL", "OS", 1)]


def test_bscans_of_a_volume_are_prepared_like_the_same_scans_as_images(kermany, tmp_path):
    """White registration padding is removed from volume B-scans as from JPEG B-scans: same model input."""
    from PIL import Image

    from medvq.config import DataConfig
    from medvq.data.preprocess import Preprocessor
    from medvq.data.samples import Sample

    padded = sorted(kermany.glob("NORMAL/*.jpeg"))
    pixels = [np.asarray(Image.open(p).convert("L")) for p in padded]
    chosen = [(p, x) for p, x in zip(padded, pixels) if (x[:4] >= 250).all() or (x[-4:] >= 250).all()][:2]  # scans with white bars
    assert chosen, "kermany-dev holds scans with white padding"
    prep = Preprocessor.from_config(DataConfig(image_size=64))
    for k, (path, x) in enumerate(chosen):
        volume = write_dicom_opt(tmp_path / f"v{k}.dcm", x[None])
        _, from_image = prep.load(Sample(path=path))
        _, from_volume = prep.load(volumes.scan_volume_file(volume)[0])
        assert not from_image.valid.all()  # the padding was found ...
        np.testing.assert_array_equal(from_volume.valid.numpy(), from_image.valid.numpy())  # ... in the B-scan too
        np.testing.assert_allclose(from_volume.image.numpy(), from_image.image.numpy(), atol=1e-6)
