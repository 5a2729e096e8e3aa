"""Tests for the synthetic OCT phantom (medvq.data.phantom)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from medvq.data.phantom import (
    CLASSES,
    LABEL_CNV,
    LABEL_DRUSEN,
    LABEL_FLUID,
    PhantomConfig,
    _render,
    make_scan,
    write_phantom,
)

SMALL = PhantomConfig(height=128, width=128)
LESIONS = ("CNV", "DME", "DRUSEN")


def rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


# --------------------------------------------------------------------------- make_scan


@pytest.mark.parametrize("kind", CLASSES)
def test_shapes_and_types(kind):
    for cfg in (PhantomConfig(), SMALL, PhantomConfig(height=64, width=160)):
        img, mask = make_scan(kind, rng(0), cfg)
        assert img.shape == mask.shape == (cfg.height, cfg.width)
        assert img.dtype == np.uint8 and mask.dtype == bool


@pytest.mark.parametrize("kind", CLASSES)
def test_same_seed_same_scan_different_seed_different(kind):
    a_img, a_mask = make_scan(kind, rng(7), SMALL)
    b_img, b_mask = make_scan(kind, rng(7), SMALL)
    c_img, c_mask = make_scan(kind, rng(8), SMALL)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert (a_img != c_img).mean() > 0.5


def test_bad_kind_names_valid_kinds():
    with pytest.raises(ValueError) as err:
        make_scan("AMD", rng(0), SMALL)
    for kind in CLASSES:
        assert kind in str(err.value)


def test_normal_mask_empty_lesion_masks_not():
    for seed in range(12):
        _, mask = make_scan("NORMAL", rng(seed), SMALL)
        assert not mask.any()
        for kind in LESIONS:
            _, mask = make_scan(kind, rng(seed), SMALL)
            assert mask.sum() >= 5, (kind, seed)


@pytest.mark.parametrize("kind", LESIONS)
def test_lesion_sizes_vary(kind):
    areas = [make_scan(kind, rng(seed), SMALL)[1].mean() for seed in range(30)]
    assert max(areas) > 3 * min(areas)
    assert max(areas) < 0.25  # a lesion never takes over the scan


@pytest.mark.parametrize("cfg", [SMALL, PhantomConfig(), PhantomConfig(height=80, width=200)], ids=str)
@pytest.mark.parametrize("kind", CLASSES)
def test_mask_is_exactly_what_the_lesion_changed(kind, cfg):
    for seed in range(4 if cfg.height > 128 else 10):
        with_lesion = _render(kind, rng(seed), cfg)
        without = _render(kind, rng(seed), cfg, lesions=False)
        changed = with_lesion.image != without.image
        # Same speckle and padding: nothing outside the mask moves ...
        assert not (changed & ~with_lesion.mask).any(), (kind, seed)
        np.testing.assert_array_equal(with_lesion.padding, without.padding)
        assert not without.mask.any()
        # ... and (almost) every mask pixel did change (equal only by 8-bit coincidence).
        if with_lesion.mask.any():
            assert changed[with_lesion.mask].mean() > 0.85, (kind, seed)


def test_cysts_darker_than_surrounding_retina():
    for seed in range(10):
        r = _render("DME", rng(seed), SMALL)
        twin = _render("DME", rng(seed), SMALL, lesions=False)
        cyst = r.label == LABEL_FLUID
        assert cyst.sum() >= 3
        ring = ndi.binary_dilation(cyst, iterations=3) & r.mask & ~cyst
        img = r.image.astype(float)
        assert img[cyst].mean() < img[ring].mean() - 15, seed
        # and darker than the retina the cyst replaced
        assert img[cyst].mean() < twin.image[cyst].astype(float).mean() - 15, seed


def test_drusen_and_cnv_lesions_brighter_than_fluid():
    means = defaultdict(list)
    both = 0
    for seed in range(25):
        for kind in ("DRUSEN", "CNV", "DME"):
            r = _render(kind, rng(seed), SMALL)
            img = r.image.astype(float)
            for label in (LABEL_FLUID, LABEL_DRUSEN, LABEL_CNV):
                sel = r.label == label
                if sel.sum() >= 3:
                    means[(kind, label)].append(img[sel].mean())
            if kind == "CNV" and (r.label == LABEL_FLUID).sum() >= 10 and (r.label == LABEL_CNV).sum() >= 10:
                both += 1
                assert img[r.label == LABEL_CNV].mean() > img[r.label == LABEL_FLUID].mean() + 30, seed
    assert both >= 3
    fluid = np.mean(means[("DME", LABEL_FLUID)] + means[("CNV", LABEL_FLUID)])
    assert np.mean(means[("DRUSEN", LABEL_DRUSEN)]) > fluid + 30
    assert np.mean(means[("CNV", LABEL_CNV)]) > fluid + 50
    assert not means[("DRUSEN", LABEL_FLUID)] and not means[("DME", LABEL_DRUSEN)]


def test_padding_is_white_and_never_lesion():
    cfg = PhantomConfig(height=96, width=96, padding_probability=1.0)
    for seed in range(20):
        for kind in CLASSES:
            r = _render(kind, rng(seed), cfg)
            assert r.padding.any()
            assert (r.image[r.padding] == 255).all()
            assert not (r.mask & r.padding).any()
    off = PhantomConfig(height=96, width=96, padding_probability=0.0)
    assert not any(_render("CNV", rng(seed), off).padding.any() for seed in range(20))


def test_padding_in_about_30_percent_of_scans():
    cfg = PhantomConfig(height=48, width=48)
    padded = np.mean([_render("NORMAL", rng(seed), cfg).padding.any() for seed in range(300)])
    assert 0.2 < padded < 0.4


def test_looks_like_a_retina():
    """Coarse anatomy: dark vitreous on top, bright RPE band, retina brighter than vitreous."""
    for seed in range(5):
        r = _render("NORMAL", rng(seed), PhantomConfig(padding_probability=0.0))
        img = r.image.astype(float)
        profile = ndi.uniform_filter1d(img.mean(axis=1), 5)
        rpe_row = int(np.argmax(profile))
        assert 0.3 * img.shape[0] < rpe_row < 0.8 * img.shape[0]
        assert profile[rpe_row] > 2.5 * profile[:40].mean()  # bright band vs vitreous
        assert img[:40].mean() < 50
        assert img[-30:].mean() < profile[rpe_row] / 2  # fades with depth


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(height=16), "height"),
        (dict(width=31), "width"),
        (dict(speckle=-0.1), "speckle"),
        (dict(noise_floor=float("nan")), "noise_floor"),
        (dict(padding_probability=1.5), "padding_probability"),
        (dict(lesion_size=(2.0, 1.0)), "lesion_size"),
        (dict(mask_min_shift=0.0), "mask_min_shift"),
        (dict(jpeg_quality=0), "jpeg_quality"),
    ],
)
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PhantomConfig(**kwargs)


# --------------------------------------------------------------------------- write_phantom

NAME = re.compile(r"^(NORMAL|CNV|DME|DRUSEN)-(\d+)-(\d+)\.jpeg$")
TINY = PhantomConfig(height=48, width=64)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_phantom_layout_and_patient_split(tmp_path):
    root = write_phantom(tmp_path / "ph", 40, seed=3, config=TINY)
    assert root == tmp_path / "ph"
    images = sorted(root.glob("*/*/*.jpeg"))
    assert len(images) == 40
    patients: dict[int, set[tuple[str, str]]] = defaultdict(set)
    per_class = defaultdict(int)
    for path in images:
        split, cls = path.parts[-3], path.parts[-2]
        assert split in ("train", "val", "test") and cls in CLASSES
        m = NAME.match(path.name)
        assert m and m.group(1) == cls
        patients[int(m.group(2))].add((split, cls))
        per_class[cls] += 1
        img = Image.open(path)
        assert img.mode == "L" and img.size == (TINY.width, TINY.height)
        mask_path = root / "masks" / split / cls / path.name.replace(".jpeg", ".png")
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == (TINY.height, TINY.width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any() == (cls != "NORMAL"), path.name
    assert all(len(v) == 1 for v in patients.values()), "a patient spans splits or classes"
    assert per_class["NORMAL"] == 20 and sum(per_class.values()) == 40
    assert {cls for cls in CLASSES if per_class[cls]} == set(CLASSES)
    assert len(list(root.glob("masks/*/*/*.png"))) == 40
    assert not list(root.rglob("*.tmp"))
    counts = {s: sum(1 for p in images if p.parts[-3] == s) for s in ("train", "val", "test")}
    assert counts["train"] > counts["test"] > 0

    meta = json.loads((root / "phantom.json").read_text())
    assert meta["seed"] == 3 and meta["n"] == 40 and meta["complete"] is True
    assert meta["config"]["height"] == 48 and meta["config"]["width"] == 64
    assert sum(sum(c.values()) for c in meta["counts"].values()) == 40


def test_write_phantom_same_seed_same_bytes(tmp_path):
    a = _tree(write_phantom(tmp_path / "a", 10, seed=5, config=TINY))
    b = _tree(write_phantom(tmp_path / "b", 10, seed=5, config=TINY))
    c = _tree(write_phantom(tmp_path / "c", 10, seed=6, config=TINY))
    assert a == b
    assert a != c
    # re-running into a finished root with the same settings is a no-op
    assert _tree(write_phantom(tmp_path / "a", 10, seed=5, config=TINY)) == a


def test_write_phantom_class_fractions_and_patients(tmp_path):
    root = write_phantom(tmp_path / "ph", 30, seed=0, config=TINY, class_fractions={"DME": 0.5, "DRUSEN": 0.5},
                         scans_per_patient=(2, 2), split_fractions=(0.5, 0.0, 0.5))
    names = [p.name for p in root.glob("*/*/*.jpeg")]
    assert {n.split("-")[0] for n in names} == {"DME", "DRUSEN"}
    assert not list(root.glob("val/*/*.jpeg"))
    ks = [int(NAME.match(n).group(3)) for n in names]
    assert set(ks) <= {1, 2}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n=0), "n"),
        (dict(n=5, seed=-1), "seed"),
        (dict(n=5, split_fractions=(0.5, 0.2, 0.2)), "split_fractions"),
        (dict(n=5, split_fractions=(1.2, -0.1, -0.1)), "split_fractions"),
        (dict(n=5, class_fractions={"NORMAL": 0.5, "CNV": 0.2}), "class_fractions"),
        (dict(n=5, class_fractions={"NORMAL": 0.5, "AMD": 0.5}), "class_fractions"),
        (dict(n=5, scans_per_patient=(0, 2)), "scans_per_patient"),
        (dict(n=5, scans_per_patient=(3, 2)), "scans_per_patient"),
    ],
)
def test_write_phantom_bad_arguments(tmp_path, kwargs, word):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=word):
        write_phantom(tmp_path / "x", n, config=TINY, **kwargs)
    assert not (tmp_path / "x").exists()


def test_write_phantom_too_small_size(tmp_path):
    with pytest.raises(ValueError, match="height"):
        write_phantom(tmp_path / "x", 4, config=PhantomConfig(height=16))


def test_write_phantom_refuses_foreign_root(tmp_path):
    write_phantom(tmp_path / "ph", 4, seed=0, config=TINY)
    with pytest.raises(FileExistsError):
        write_phantom(tmp_path / "ph", 4, seed=1, config=TINY)
    (tmp_path / "other" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        write_phantom(tmp_path / "other", 4, config=TINY)
