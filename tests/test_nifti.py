"""NIfTI data: HipMRI slice layouts, volumes slice by slice, empty slices, NaN/inf, normalisation, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvq.config import DataConfig
from medvq.data.dataset import ScanDataset
from medvq.data.nifti import VolumeOptions, read_nifti, scan_nifti, scan_nifti_file, split_by_position, subject_id
from medvq.data.preprocess import Preprocessor
from medvq.data.readers import read_sample
from medvq.data.samples import Sample, collect_images, dataset_splits, scan_dataset
from medvq.errors import ImageReadError


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, intent: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if intent:
        img.header.set_intent(intent)
    nib.save(img, path)
    return path


def _blob(shape: tuple[int, ...], seed: int = 0, level: float = 400.0) -> np.ndarray:
    """A bright ellipse with texture on a zero background (float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = ((yy - shape[0] / 2) / (shape[0] * 0.4)) ** 2 + ((xx - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    return (inside * (level + 50 * rng.standard_normal(shape[:2]))).astype(np.float32)


def _volume(x: int = 24, y: int = 28, z: int = 12, empty: tuple[int, ...] = (0, 1, 11)) -> np.ndarray:
    """(X, Y, Z) with slice k holding a blob of brightness 100 * (k + 1), and the listed slices all zero."""
    vol = np.zeros((x, y, z), np.float32)
    for k in range(z):
        if k not in empty:
            vol[:, :, k] = _blob((x, y), seed=k, level=100.0 * (k + 1)).clip(0)
    return vol


def test_hipmri_layout_mixed_slice_sizes_and_case_patients(tmp_path):
    root = tmp_path / "hip"
    sizes = {"train": [("004", (256, 128)), ("004", (256, 144)), ("011", (256, 128))], "validate": [("020", (256, 144))], "test": [("031", (256, 128))]}
    for split, items in sizes.items():
        for k, (case, shape) in enumerate(items):
            _save(root / split / f"case_{case}_week_{k}_slice_{k + 3}.nii.gz", _blob(shape, seed=k))
    samples = scan_dataset(root)
    assert len(samples) == 5 and all(s.frame is None and s.label == "" for s in samples)
    assert {s.split for s in samples} == {"train", "val", "test"}, "validate/ is the val split"
    assert sorted({s.patient_id for s in samples}) == ["004", "011", "020", "031"]
    parts = dataset_splits(root, val_fraction=0.15, test_fraction=0.3, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    prep = Preprocessor(image_size=64)
    data = ScanDataset(parts["train"], prep, load_masks=False)
    assert data.images.shape == (3, 1, 64, 64) and 0 <= data.images.min() and data.images.max() <= 1
    assert {(g.height, g.width) for g in data.geometry} == {(256, 128), (256, 144)}
    assert subject_id(Path("case_004_week_2_slice_17.nii.gz")) == "004" and subject_id(Path("sub-01_T1w.nii.gz")) == "sub-01_T1w"


def test_volume_sliced_in_display_orientation_skipping_empty_slices(tmp_path):
    vol = _volume()
    path = _save(tmp_path / "subj.nii.gz", vol)
    options = VolumeOptions(min_foreground_fraction=0.05)
    samples = scan_nifti_file(path, options)
    assert [s.frame for s in samples] == list(range(2, 11)), "slices 0, 1 and 11 are empty"
    assert all(s.patient_id == "subj" for s in samples)
    assert [s.meta["position_mm"] for s in samples[:2]] == [2.0, 3.0]
    image = read_nifti(path, 5, options)
    assert image.shape == (28, 24)  # axial slice of RAS (X, Y): rows = Y (anterior up), columns = X
    expected = np.flipud(vol[:, :, 5].T)
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.99
    coronal = read_nifti(path, 10, VolumeOptions(slice_axis="coronal"))
    assert coronal.shape == (12, 24)


def test_orientation_does_not_depend_on_how_the_voxels_are_stored(tmp_path):
    vol = _volume()
    ras = _save(tmp_path / "ras.nii.gz", vol)
    lps = _save(tmp_path / "lps.nii.gz", vol[::-1, ::-1, :].copy(), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))
    options = VolumeOptions()
    for frame in (3, 7):
        np.testing.assert_allclose(read_nifti(ras, frame, options), read_nifti(lps, frame, options))


def test_4d_series_all_first_or_mean(tmp_path):
    series = np.stack([_volume(empty=(0,)) * (t + 1) for t in range(3)], axis=-1)  # (X, Y, Z, T=3)
    path = _save(tmp_path / "fmri.nii.gz", series)
    every = scan_nifti_file(path, VolumeOptions())
    assert len(every) == 3 * 11 and {s.meta["volume"] for s in every} == {0, 1, 2}
    assert every[11].frame == 13 and every[11].meta == {"volume": 1, "slice": 1, "position_mm": 1.0}
    first = scan_nifti_file(path, VolumeOptions(series_volumes="first"))
    mean = scan_nifti_file(path, VolumeOptions(series_volumes="mean"))
    assert len(first) == len(mean) == 11
    # per-volume normalisation: a volume twice as bright reads the same
    np.testing.assert_allclose(read_nifti(path, 5, VolumeOptions()), read_nifti(path, 12 + 5, VolumeOptions()), atol=1e-5)


def test_nan_and_inf_become_background_and_high_clip(tmp_path):
    vol = _volume()
    vol[3, 4, 6] = np.nan
    vol[5, 6, 6] = np.inf
    vol[7, 8, 6] = -np.inf
    path = _save(tmp_path / "bad_voxels.nii.gz", vol)
    options = VolumeOptions()
    image = read_nifti(path, 6, options)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    # voxel (x, y) appears at row Y-1-y, column x in the axial display
    assert image[28 - 1 - 4, 3] == 0.0 and image[28 - 1 - 6, 5] == 1.0 and image[28 - 1 - 8, 7] == 0.0
    clean = _volume()
    clean_img = read_nifti(_save(tmp_path / "clean.nii.gz", clean), 6, options)
    untouched = np.ones_like(image, bool)
    untouched[[23, 21, 19], [3, 5, 7]] = False
    np.testing.assert_allclose(image[untouched], clean_img[untouched], atol=1e-4)  # three voxels fewer shift the percentiles a hair


def test_percentile_normalisation_per_volume_and_per_slice(tmp_path):
    vol = _volume()
    vol[10, 10, 8] = 1e6  # one hot voxel must not squash the contrast
    path = _save(tmp_path / "v.nii.gz", vol)
    by_volume = VolumeOptions(intensity_scope="volume")
    by_slice = VolumeOptions(intensity_scope="slice")
    dim, bright = read_nifti(path, 3, by_volume), read_nifti(path, 9, by_volume)
    assert bright.mean() > 2 * dim.mean(), "per-volume scaling keeps the slices' relative brightness"
    s_dim, s_bright = read_nifti(path, 3, by_slice), read_nifti(path, 9, by_slice)
    assert abs(s_dim.mean() - s_bright.mean()) < 0.1, "per-slice scaling gives every slice the same range"
    assert np.quantile(read_nifti(path, 8, by_slice)[read_nifti(path, 8, by_slice) > 0], 0.5) > 0.3
    assert (read_nifti(path, 3, VolumeOptions(intensity_low_percentile=0, intensity_high_percentile=100)) <= dim + 1e-6).all()


def test_training_and_inference_read_the_same_slices_identically(tmp_path, colin27):
    config = DataConfig(image_size=64, intensity_scope="volume")
    prep = Preprocessor.from_config(config, stride=8)
    listed = scan_nifti_file(colin27, prep.volume)
    assert prep.volume.min_side == 8 and 150 < len(listed) < 181, "the empty slices above the head are skipped"
    inferred = collect_images([colin27], prep.volume)
    assert [(s.path, s.frame) for s in inferred] == [(s.path, s.frame) for s in listed]
    chosen = [listed[10], listed[90]]
    train_view = ScanDataset(chosen, prep, load_masks=False).images
    for i, sample in enumerate(chosen):
        raw, prepared = prep.load(sample)  # what Detector.predict_files does for each scan
        np.testing.assert_array_equal(raw, read_sample(sample, prep.volume))
        torch.testing.assert_close(prepared.image.half(), train_view[i])
    other = Preprocessor.from_config(DataConfig(image_size=64, intensity_scope="slice"))
    assert not np.allclose(read_sample(chosen[0], other.volume), read_sample(chosen[0], prep.volume))


def test_nibabel_example_files(nibabel_data):
    options = VolumeOptions()
    counts = {name: len(scan_nifti_file(nibabel_data / name, options)) for name in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz")}
    assert counts["anatomical.nii"] == 25 and counts["example4d.nii.gz"] > 24 and counts["example_nifti2.nii.gz"] == 24
    for name in counts:
        samples = scan_nifti_file(nibabel_data / name, options)
        image = read_sample(samples[len(samples) // 2], options)
        assert image.ndim == 2 and np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1 and image.max() > 0.5
    with pytest.raises(ImageReadError, match=r"functional\.nii.*smaller than the model stride \(32 px"):
        scan_nifti_file(nibabel_data / "functional.nii", VolumeOptions(min_side=32))


def test_folder_of_volumes_splits_by_subject(tmp_path):
    for k in range(6):
        _save(tmp_path / "vols" / f"sub-{k:02d}.nii.gz", _volume() * (k + 1))
    parts = dataset_splits(tmp_path / "vols", val_fraction=0.2, test_fraction=0.3, seed=0)
    subjects = {name: {s.patient_id for s in items} for name, items in parts.items()}
    assert all(subjects.values()) and not (subjects["train"] & subjects["test"]) and not (subjects["train"] & subjects["val"])
    assert sum(len(v) for v in subjects.values()) == 6
    assert all(len(items) % 9 == 0 for items in parts.values()), "whole volumes (9 non-empty slices each) per split"


def test_split_by_position_keeps_slabs_apart(colin27):
    samples = scan_nifti_file(colin27, VolumeOptions())
    parts = split_by_position(samples, {"train": 0.6, "val": 0.1, "test": 0.3}, gap_mm=10)
    pos = {k: np.array([s.meta["position_mm"] for s in v]) for k, v in parts.items()}
    assert pos["train"].max() < pos["val"].min() < pos["test"].min()
    assert pos["val"].min() - pos["train"].max() >= 10 and pos["test"].min() - pos["val"].max() >= 10
    assert np.abs(pos["test"][:, None] - pos["train"][None]).min() >= 10
    assert len(parts["train"]) > 80 and len(parts["test"]) > 35
    with pytest.raises(ValueError, match="one volume"):
        split_by_position([*samples[:3], Sample(path=Path("other.nii"), frame=1, meta={"position_mm": 0.0})], {"a": 0.5, "b": 0.5}, 1)


# --- bad inputs ---------------------------------------------------------------------------------
def test_unexpected_axes_are_refused(tmp_path):
    five_d = _save(tmp_path / "warp.nii.gz", np.ones((8, 8, 8, 1, 3), np.float32))
    with pytest.raises(ImageReadError, match=r"warp\.nii\.gz: unexpected axis: 5D data"):
        scan_nifti_file(five_d, VolumeOptions())
    vectors = _save(tmp_path / "vectors.nii.gz", np.ones((16, 16, 8, 3), np.float32), intent="vector")
    with pytest.raises(ImageReadError, match=r"vectors\.nii\.gz: unexpected axis: the 4th axis .* vector components"):
        scan_nifti_file(vectors, VolumeOptions())
    line = _save(tmp_path / "line.nii.gz", np.ones((64, 1, 1), np.float32))
    with pytest.raises(ImageReadError, match=r"line\.nii\.gz: no 2D image data"):
        scan_nifti_file(line, VolumeOptions())


def test_zero_filled_and_nan_volumes_are_named(tmp_path):
    zeros = _save(tmp_path / "zeros.nii.gz", np.zeros((16, 16, 8), np.float32))
    with pytest.raises(ImageReadError, match=r"zeros\.nii\.gz: every voxel is 0 \(zero-filled"):
        scan_nifti_file(zeros, VolumeOptions())
    nan_slice = _save(tmp_path / "case_001_week_0_slice_0.nii.gz", np.full((32, 32), np.nan, np.float32))
    samples = scan_nifti_file(nan_slice, VolumeOptions())  # slice files are listed from their header ...
    with pytest.raises(ImageReadError, match=r"case_001_week_0_slice_0\.nii\.gz: no finite voxels"):
        read_sample(samples[0])  # ... and refused when read
    faint = _volume()
    faint[faint > 0] = 0
    faint[:2, :2, :] = 5.0
    with pytest.raises(ImageReadError, match=r"faint\.nii\.gz: no axial slice has 5% foreground"):
        scan_nifti_file(_save(tmp_path / "faint.nii.gz", faint), VolumeOptions())


def test_corrupt_files_are_named(tmp_path):
    good = _save(tmp_path / "good.nii.gz", _volume())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match=r"truncated\.nii\.gz: cannot read NIfTI data.*corrupt or truncated"):
        scan_nifti_file(truncated, VolumeOptions())
    garbage = tmp_path / "garbage.nii.gz"
    with gzip.open(garbage, "wb") as f:
        f.write(b"not a nifti header at all" * 4)
    with pytest.raises(ImageReadError, match=r"garbage\.nii\.gz: cannot read NIfTI header"):
        scan_nifti_file(garbage, VolumeOptions())
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.nii: empty file"):
        scan_nifti(tmp_path / "empty.nii", VolumeOptions())


def test_slice_smaller_than_the_stride(tmp_path):
    thin = _save(tmp_path / "case_007_week_1_slice_2.nii.gz", _blob((64, 6)))
    with pytest.raises(ImageReadError, match=r"case_007_week_1_slice_2\.nii\.gz: the slice is 6x64 px, smaller than the model stride \(16 px"):
        scan_nifti_file(thin, VolumeOptions(min_side=16))
    flat = _save(tmp_path / "flat.nii.gz", _volume(z=4, empty=()))
    with pytest.raises(ImageReadError, match=r"flat\.nii\.gz: each coronal slice is 24x4 px"):
        scan_nifti_file(flat, VolumeOptions(slice_axis="coronal", min_side=8))
