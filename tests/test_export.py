"""ONNX export: the exported scoring graph gives the torch path's maps and scores on real scans, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medvq.cli import app
from medvq.data.readers import read_image
from medvq.data.samples import Sample, scan_dataset
from medvq.detector import Detector
from medvq.export import exportable_methods
from medvq.onnx_runtime import OnnxScorer, area_weights, bilinear_weights, resize_image
from tiny_runs import MODELS, make_run

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def test_every_exportable_method_is_tested():
    assert set(exportable_methods()) == set(MODELS)


@pytest.fixture(scope="module")
def scans(kermany) -> list[Sample]:
    samples = sorted(scan_dataset(kermany), key=lambda s: s.path.name)
    normals = [s for s in samples if s.label == "NORMAL"]
    others = [s for s in samples if s.label != "NORMAL"]
    widths = {}
    for s in others:  # one abnormal scan per file-name class, of different widths; some carry white padding
        widths.setdefault(s.label, s)
    return normals[:4] + list(widths.values())


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, scans, tmp_path_factory):
    method = request.param
    root = tmp_path_factory.mktemp(f"export-{method}")
    run = make_run(method, root / "run", scans[:4])
    out = root / f"{method}.onnx"
    result = CliRunner().invoke(app, ["export", str(run.root), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return run, out


def test_resizing_matrices_equal_the_torch_preprocessing(scans):
    import torch.nn.functional as F

    image = read_image(scans[-1].path)
    ref = F.interpolate(torch.from_numpy(image)[None, None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    assert np.abs(resize_image(image, 64) - ref.clamp(0, 1).numpy()).max() < 1e-5
    up = F.interpolate(torch.ones(1, 1, 5, 7), size=(9, 11), mode="bilinear", antialias=True, align_corners=False)
    assert np.allclose(bilinear_weights(5, 9).sum(1), 1) and np.allclose(up.numpy(), 1)
    mask = np.zeros((50, 30)); mask[:13] = 1
    area = F.interpolate(torch.from_numpy(mask)[None, None], size=(8, 8), mode="area")[0, 0].numpy()
    assert np.allclose(area_weights(50, 8) @ mask @ area_weights(30, 8).T, area)


def test_onnx_maps_and_scores_equal_torch_on_real_scans(exported, scans):
    run, path = exported
    detector = Detector.load(run.root)
    scorer = OnnxScorer(path)
    for sample in scans:
        image, prepared = detector.preprocessor.load(sample)
        x, valid, geometry = scorer.prepare(image)
        assert geometry == prepared.geometry
        assert np.abs(x - prepared.image.numpy()).max() < 1e-5
        assert np.array_equal(valid > 0.5, prepared.valid.numpy())
        pred = detector.predict(prepared.image[None], prepared.valid[None])
        outs = scorer.run(x[None], valid[None])
        assert {k[4:] for k in outs if k.startswith("map_")} == {k.replace("+", "__") for k in pred.maps}
        for name, m in pred.maps.items():
            assert np.abs(outs[f"map_{name.replace('+', '__')}"] - m.numpy()).max() < TOLERANCE, (sample.path.name, name)
        table = detector.calibration.score_table(pred.scores)
        for name, t in table.items():
            key = name.replace("+", "__")
            assert abs(outs[f"score_{key}"][0] - t["score"][0]) < TOLERANCE, (sample.path.name, name)
            # the share of normals scoring at most the same: equal unless a normal's score lies within the tolerance
            normals = np.asarray(detector.calibration.stats[name].normal_scores)
            lo, hi = (np.searchsorted(normals, t["score"][0] + d, side="right") / len(normals) * 100 for d in (-TOLERANCE, TOLERANCE))
            assert lo - 1e-4 <= outs[f"percentile_{key}"][0] <= hi + 1e-4
            # z divides by the normals' score spread, so it carries the score's error scaled by it
            spread = detector.calibration.stats[name].score_std
            assert abs(outs[f"z_{key}"][0] - t["z"][0]) < TOLERANCE * max(1.0, 1.0 / spread)
        decision = scorer.meta["decision_map"]
        if abs(pred.scores[decision][0] - scorer.meta["threshold"]) > TOLERANCE:
            assert outs["abnormal"][0] == float(pred.scores[decision][0] > scorer.meta["threshold"])


def test_batch_of_several_scans_equals_one_by_one(exported, scans):
    _, path = exported
    scorer = OnnxScorer(path)
    prepared = [scorer.prepare(read_image(s.path)) for s in scans[:3]]
    batch = scorer.run(np.stack([p[0] for p in prepared]), np.stack([p[1] for p in prepared]))
    for i, p in enumerate(prepared):
        single = scorer.run(p[0][None], p[1][None])
        for k in single:
            assert np.abs(batch[k][i] - single[k][0]).max() < TOLERANCE


def test_runs_without_torch_on_image_files(exported, scans):
    """The documented way to score files with onnxruntime: torch cannot even be imported."""
    run, path = exported
    files = [str(s.path) for s in scans[-2:]]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from medvq.onnx_runtime import main\n"
        f"sys.exit(main({[str(path), *files]!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split(",") for line in done.stdout.strip().splitlines()]
    header, rows = rows[0], rows[1:]
    assert [r[0] for r in rows] == files
    reference = Detector.load(run.root).predict_files(files)
    for row, ref in zip(rows, reference):
        for name, s in ref.scores.items():
            assert float(row[header.index(name)]) == pytest.approx(s["score"], abs=TOLERANCE)
        assert row[header.index("abnormal")] == str(int(ref.decision.abnormal))


def test_volumes_give_one_result_per_bscan_or_slice_as_infer(exported, scans, nibabel_data, tmp_path):
    """An OCT volume was scored as its first B-scan only, and a NIfTI volume refused; now each B-scan and each
    slice (read with the run's volume settings, carried in the graph) gets its result, equal to the Detector's."""
    from volume_files import write_dicom_opt

    from medvq.data.samples import collect_images

    run, path = exported
    images = [np.asarray(read_image(s.path) * 255, dtype=np.uint8) for s in scans]
    frames = np.stack([im for im in images if im.shape == images[0].shape][:2])  # B-scans of one volume share a size
    assert len(frames) == 2
    volume = write_dicom_opt(tmp_path / "P1.dcm", frames, patient="P1", laterality="R")
    nifti = nibabel_data / "anatomical.nii"
    detector = Detector.load(run.root)
    scorer = OnnxScorer(path)
    assert scorer.volume == detector.preprocessor.volume
    samples = collect_images([volume, nifti], detector.preprocessor.volume)
    results = scorer.score_files([volume, nifti])
    assert [(r.path, r.frame) for r in results] == [(s.path, s.frame) for s in samples] and results[1].frame == 1
    for r, ref in zip(results, detector.predict_files(samples)):
        for name, value in ref.scores.items():
            assert r.scores[name]["score"] == pytest.approx(value["score"], abs=TOLERANCE), (r.path, r.frame, name)


def test_export_refuses_bad_requests(exported, tmp_path):
    run, _ = exported
    runner = CliRunner()
    cases = [
        (["export", str(run.root), "--out", str(tmp_path / "model.onx")], ".onnx suffix"),
        (["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")], "config.yaml"),
        (["export", str(run.root), "--format", "tflite", "--out", str(tmp_path / "m.onnx")], "unknown export format"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
    with pytest.raises(Exception, match="is a medvq run folder, not an ONNX model"):  # was 'no such ONNX file'
        OnnxScorer(run.root)
    (tmp_path / "not.onnx").write_bytes(b"not a model")
    with pytest.raises(Exception, match="not a readable ONNX model"):
        OnnxScorer(tmp_path / "not.onnx")


def test_a_reader_that_stops_early_is_not_an_error(exported, scans, tmp_path, monkeypatch):
    """`python -m medvq.onnx_runtime ... | head -3` ended in a BrokenPipeError traceback."""
    import medvq.onnx_runtime as runner_module

    _, path = exported

    def closed_pipe(results, stream):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(runner_module, "_write_rows", closed_pipe)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert runner_module.main([str(path), str(scans[0].path)]) == 0


def test_graph_metadata_carries_the_preprocessing(exported):
    run, path = exported
    scorer = OnnxScorer(path)
    config = Detector.load(run.root).config
    assert scorer.meta["image_size"] == config.data.image_size and scorer.meta["fov"] == config.data.fov
    assert json.loads(json.dumps(scorer.meta))["method"] == config.method
