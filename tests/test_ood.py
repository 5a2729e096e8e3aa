import numpy as np
import pytest
import torch

from medvq.scoring.ood import MARGIN, DistributionGuard, scan_features


def test_guard_passes_its_normals_and_flags_a_shifted_feature():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(30, 4))
    guard = DistributionGuard().fit(normals, ["a", "b", "c", "d"])
    assert guard.threshold == pytest.approx(MARGIN * max(guard.normal_distances))
    assert (guard.distance(normals, ["a", "b", "c", "d"]) <= guard.threshold).all()
    fresh = rng.normal(size=(200, 4))
    assert (guard.distance(fresh, ["a", "b", "c", "d"]) <= guard.threshold).mean() > 0.97
    foreign = fresh[:10].copy()
    foreign[:, 2] += 20  # one feature far off is enough
    assert (guard.distance(foreign, ["a", "b", "c", "d"]) > guard.threshold).all()
    again = DistributionGuard.from_dict(guard.to_dict())
    np.testing.assert_allclose(again.distance(foreign, list("abcd")), guard.distance(foreign, list("abcd")))
    with pytest.raises(ValueError, match="do not match"):
        guard.distance(foreign, ["a", "b", "c", "x"])
    with pytest.raises(ValueError, match="at least 3"):
        DistributionGuard().fit(normals[:2], list("abcd"))


def test_scan_features_ignore_invalid_pixels():
    images = torch.full((2, 1, 16, 16), 0.2)
    images[1, 0, :4] = 1.0  # white padding rows on the second scan
    valid = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    valid[1, 0, :4] = False
    maps = {"residual": torch.zeros(2, 1, 16, 16)}
    maps["residual"][1, 0, :4] = 50.0
    f, names = scan_features(images, valid, maps)
    assert names[:5] == ["intensity_q05", "intensity_q25", "intensity_q50", "intensity_q75", "intensity_q95"] and names[-1] == "median_residual"
    np.testing.assert_allclose(f[0, :5], f[1, :5])  # padding does not change the intensity quantiles
    assert f[1, -1] == 0.0


def test_scan_features_of_a_batch_equal_those_taken_scan_by_scan():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 12, 12, generator=g)
    valid = torch.rand(4, 1, 12, 12, generator=g) > 0.3
    valid[0] = True
    valid[1] = False  # no valid pixel: every pixel counts
    maps = {"a": torch.randn(4, 1, 12, 12, generator=g), "b": 3 * torch.randn(4, 1, 12, 12, generator=g)}
    f, _ = scan_features(images, valid, maps)
    for i in range(4):
        keep = valid[i, 0] if valid[i].any() else torch.ones(12, 12, dtype=torch.bool)
        quantiles = torch.quantile(images[i, 0][keep], torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
        np.testing.assert_array_equal(f[i, :5], quantiles.numpy().astype(np.float64))
        np.testing.assert_array_equal(f[i, 7:], [float(m[i, 0][keep].median()) for m in maps.values()])


def test_appearance_part_passes_its_reference_and_flags_a_shifted_cloud():
    from medvq.scoring.ood import APPEARANCE_MARGIN, AppearanceGuard

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 16))
    part = AppearanceGuard().fit(reference)
    assert part.threshold == pytest.approx(APPEARANCE_MARGIN * max(part.normal_distances)) and part.n_reference == 60
    assert (part.distance(reference) <= part.threshold).all()  # each is its own nearest neighbour
    fresh = rng.normal(size=(200, 16))
    assert (part.distance(fresh) <= part.threshold).mean() > 0.9
    shifted = fresh + 2.0  # every feature a little off together: no single one far out
    assert (part.distance(shifted) > part.threshold).all()
    names = [f"f{i}" for i in range(16)]
    per_feature = DistributionGuard().fit(reference, names)  # the largest z-score of any one feature misses it
    assert not (per_feature.distance(shifted, names) > per_feature.threshold).any()
    with pytest.raises(ValueError, match="at least"):
        AppearanceGuard().fit(reference[:1])


def test_guard_with_appearance_part_is_in_threshold_units_and_older_guards_still_load():
    rng = np.random.default_rng(1)
    normals, looks = rng.normal(size=(20, 4)), rng.normal(size=(40, 8))
    guard = DistributionGuard().fit(normals, list("abcd"), looks)
    assert guard.threshold == 1.0 and guard.feature_threshold == pytest.approx(MARGIN * max(guard.normal_distances))
    scans, scan_looks = rng.normal(size=(5, 4)), rng.normal(size=(5, 8))
    expected = np.maximum(
        np.max(np.abs(scans - np.asarray(guard.median)) / np.asarray(guard.scale), axis=1) / guard.feature_threshold,
        guard.appearance.distance(scan_looks) / guard.appearance.threshold,
    )
    np.testing.assert_allclose(guard.distance(scans, list("abcd"), scan_looks), expected)
    parts = guard.parts(scans, list("abcd"), scan_looks)  # each part over its own threshold; the distance is the larger
    assert set(parts) == {"features", "appearance"}
    np.testing.assert_allclose(parts["appearance"], guard.appearance.distance(scan_looks) / guard.appearance.threshold)
    np.testing.assert_allclose(DistributionGuard.combine(parts), expected)
    again = DistributionGuard.from_dict(guard.to_dict())
    np.testing.assert_allclose(again.distance(scans, list("abcd"), scan_looks), expected)
    with pytest.raises(ValueError, match="appearance"):
        guard.distance(scans, list("abcd"))
    older = {k: v for k, v in DistributionGuard().fit(normals, list("abcd")).to_dict().items() if k not in ("appearance", "feature_threshold")}
    old_guard = DistributionGuard.from_dict(older)  # a calibration.json written before the appearance part
    assert old_guard.appearance is None and set(old_guard.parts(scans, list("abcd"))) == {"features"}
    np.testing.assert_allclose(old_guard.distance(scans, list("abcd")), old_guard.parts(scans, list("abcd"))["features"])  # its own units


def test_guard_flags_oct_scans_from_another_device(tiny_phantom, tmp_path):
    """Phantom anatomy without speckle or noise floor (a heavily averaging scanner) given to a model calibrated
    on the usual phantom: the appearance part flags every scan on its own; scans of the calibration source pass."""
    from tiny_runs import make_run

    from medvq.data.phantom import PhantomConfig, write_phantom
    from medvq.data.samples import Sample, scan_dataset
    from medvq.detector import Detector

    normals = [s for s in scan_dataset(tiny_phantom) if s.label == "NORMAL" and s.split == "train"][:12]
    run = make_run("vqvae", tmp_path / "run", normals)
    detector = Detector.load(run.root)
    guard = detector.calibration.guard
    other = write_phantom(tmp_path / "device", 12, seed=9, config=PhantomConfig(height=128, width=128, speckle=0.0, noise_floor=0.0))
    same = write_phantom(tmp_path / "same", 12, seed=9, config=PhantomConfig(height=128, width=128))
    for root, flagged in ((other, 12), (same, 0)):
        results = detector.predict_files([s.path for s in scan_dataset(root)])
        verdicts = [r.decision.in_distribution for r in results]
        assert len(verdicts) == 12 and (verdicts.count(False) == flagged if flagged else verdicts.count(False) <= 1)
    data = [Sample(path=s.path) for s in scan_dataset(other)]
    prepared = [detector.preprocessor.load(s)[1] for s in data]
    images, valid = torch.stack([p.image for p in prepared]), torch.stack([p.valid for p in prepared])
    assert (guard.appearance.distance(detector.appearance(images, valid)) > guard.appearance.threshold).all()
    pred = detector.predict(images, valid)  # the prediction tells which part flagged them
    assert (pred.ood_parts["appearance"] > 1).all() and (pred.ood_parts["appearance"] >= pred.ood_parts["features"]).any()
    np.testing.assert_allclose(pred.ood_distance, np.maximum(pred.ood_parts["features"], pred.ood_parts["appearance"]))


def test_patchcore_lends_its_backbone_stages_to_the_guard(tiny_phantom, tmp_path):
    """PatchCore (and a VQ-VAE with its perceptual map) runs the guard's ImageNet network itself: the guard
    pools those stage outputs (no second pass) and gets what its own network would; a VQ-VAE without the map
    has the guard run the network on a shrunken input."""
    from tiny_runs import MODELS, make_run

    from medvq.config import build_config
    from medvq.data.dataset import ScanDataset
    from medvq.data.samples import scan_dataset
    from medvq.detector import Detector
    from medvq.models.registry import get_method
    from medvq.scoring.ood import APPEARANCE_SIZE

    scans = [s for s in scan_dataset(tiny_phantom) if s.label == "NORMAL"]
    config = build_config({"method": "patchcore", "data": {"image_size": 64}, "model": MODELS["patchcore"]})
    model = get_method("patchcore").build_model(config.model).eval()
    model.features.load_imagenet()  # the weights a trained PatchCore has
    shared = Detector(model, config)
    normals = ScanDataset(scans[:8], shared.preprocessor)
    feats = model.embed(normals.images.float())
    model.set_memory_bank(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])[::7])
    shared.calibrate(normals)
    assert shared.calibration.guard.appearance.input_size == 64 and shared._share_network()
    alone = Detector(model, config, shared.calibration)
    alone._shares_network = False  # as if the model had another network: the guard's own pass
    paths = [s.path for s in scans[8:14]]
    a = [r.decision.ood_distance for r in shared.predict_files(paths)]
    b = [r.decision.ood_distance for r in alone.predict_files(paths)]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # A VQ-VAE's perceptual map runs the same network on the scan (after its reconstruction): the guard pools the scan's stages
    vq = Detector.load(make_run("vqvae", tmp_path / "vq", scans[:8], image_size=128).root)
    assert vq._share_network() and vq.calibration.guard.appearance.input_size == 128
    vq_alone = Detector(vq.model, vq.config, vq.calibration)
    vq_alone._shares_network = False
    a = [r.decision.ood_distance for r in vq.predict_files(paths)]
    np.testing.assert_allclose(a, [r.decision.ood_distance for r in vq_alone.predict_files(paths)], rtol=1e-4)
    # without it (and in runs from before it) the guard runs its own network on a shrunken input
    config = build_config({"method": "vqvae", "data": {"image_size": 128}, "model": {**MODELS["vqvae"], "perceptual_map": False}})
    plain = Detector(get_method("vqvae").build_model(config.model).eval(), config)
    plain.calibrate(ScanDataset(scans[:8], plain.preprocessor))
    assert not plain._share_network() and plain.calibration.guard.appearance.input_size == APPEARANCE_SIZE == 64


def test_infer_notes_a_folder_scored_wholly_above_every_calibration_normal(tiny_phantom, tmp_path):
    """A folder scored almost wholly above every calibration normal gets a note (the guard does not see every
    change of source: real scans given to a model of phantom normals often pass it); one scored among the
    normals gets none. The same scans, scored by a run whose calibration normals score low or as they do."""
    import json

    from rich.console import Console
    from tiny_runs import make_run

    from medvq.data.samples import scan_dataset
    from medvq.inference import infer

    normals = [s for s in scan_dataset(tiny_phantom) if s.label == "NORMAL" and s.split == "train"][:12]
    run = make_run("patchcore", tmp_path / "run", normals)
    scans = [s.path for s in scan_dataset(tiny_phantom) if s.label == "NORMAL" and s.split == "test"][:8]

    def note(tag: str) -> str:
        console = Console(record=True, width=200)
        infer(run.root, scans, tmp_path / tag, save_overlays=False, save_npy=False, console=console)
        return " ".join(console.export_text().split())

    assert "calibration normals on" not in note("as-calibrated")
    calibration = json.loads(run.calibration.read_text())
    primary = calibration["primary_map"]
    calibration["stats"][primary]["normal_scores"] = [-1e6] * 12  # every scan now scores above every normal
    run.calibration.write_text(json.dumps(calibration))
    assert f"8 of 8 scans score above every one of the 12 calibration normals on '{primary}'" in note("lowered")
