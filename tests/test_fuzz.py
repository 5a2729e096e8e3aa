"""Hostile inputs to every command, run in-process: each ends in one clear line naming the file (exit 2) or
in a correct result; never a traceback, and inputs and earlier results stay byte for byte as they were."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from medvq.cli import app

runner = CliRunner()

TINY = [
    "--image-size", "32", "--val-fraction", "0.2", "--test-fraction", "0.3",
    "--hidden-channels", "16", "--residual-channels", "8", "--residual-layers", "1", "--embedding-dim", "8",
    "--codebook-size", "16", "--downsample-layers", "2",
    "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--samples-per-epoch", "2", "--min-images-per-epoch", "0",
    "--precision", "32",
]


OUTCOMES: Counter[str] = Counter()  # every command run here, by how it ended


@pytest.fixture(scope="module", autouse=True)
def outcome_summary():
    yield
    print(f"\nfuzz commands: {sum(OUTCOMES.values())} ({', '.join(f'{k} {v}' for k, v in sorted(OUTCOMES.items()))})")
    assert OUTCOMES["traceback"] == 0


def cli(*args) -> tuple[int, str]:
    """Exit code and stderr+stdout of one command; a traceback anywhere fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output
    OUTCOMES[{0: "correct result", 2: "clear error", 130: "interrupted, one line"}.get(result.exit_code, "traceback")] += 1
    assert "Traceback" not in text and not isinstance(result.exception, (AssertionError, NameError, TypeError, AttributeError)), text
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {text}")
    return result.exit_code, text


def one_error(code: int, text: str, *names) -> str:
    """The command failed with exit 2 and one 'error:' line naming each of ``names``."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, text
    assert len(errors) == 1, text
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files that exist), to show nothing changed."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medvq.data.phantom import PhantomConfig, write_phantom

    return write_phantom(tmp_path_factory.mktemp("fuzz") / "phantom", 48, seed=5, config=PhantomConfig(height=64, width=64))


@pytest.fixture(scope="module")
def run(data) -> Path:
    out = data.parent / "run"
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *TINY)
    assert code == 0, text
    return out


@pytest.fixture()
def scans(data, tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in sorted((data / "test").rglob("*.jpeg"))[:4]:
        shutil.copy(p, folder / p.name)
    return folder


def copy_run(run: Path, tmp_path: Path) -> Path:
    other = tmp_path / "run-copy"
    shutil.copytree(run, other)
    return other


# --- data loss ---------------------------------------------------------------------------------
def test_infer_never_reads_its_own_outputs_back(run, scans):
    before = digest(scans)
    for _ in range(2):
        code, text = cli("infer", run, scans, "--out", scans / "results")
        assert code == 0, text
        assert "4 scans scored" in text
    code, text = cli("infer", run, scans, "--out", scans)  # --out is the input folder itself
    assert code == 0 and "4 scans scored" in text, text
    code, text = cli("infer", run, scans, "--out", scans)
    assert code == 0 and "4 scans scored" in text, text
    assert all(digest(scans)[k] == v for k, v in before.items()), "input scans unchanged"


def test_results_written_beside_the_scans_never_hide_them_or_come_back_as_scans(run, scans, tmp_path):
    """--out is the scan folder: the scans stay findable from a folder above, and a volume's en-face PNGs are
    not read back as scans (both failed before: the scan folder was marked as results, volumes/ was not)."""
    from volume_files import write_dicom_opt

    frames = np.stack([np.asarray(Image.open(p).convert("L")) for p in sorted(scans.glob("*.jpeg"))[:2]])
    write_dicom_opt(scans / "P1.dcm", frames, patient="P1", laterality="R")
    for _ in range(2):
        code, text = cli("infer", run, scans, "--out", scans)
        assert code == 0 and "6 scans scored" in text, text  # 4 scans and 2 B-scans, the en-face PNGs never
    assert (scans / "volumes" / "P1_enface.png").is_file()
    code, text = cli("infer", run, scans.parent, "--out", tmp_path / "from-above")
    assert code == 0 and "6 scans scored" in text, text
    one = sorted(scans.glob("*.jpeg"))[0]
    for _ in range(2):  # a scan of the folder that --out is: the folder stays unmarked, so the scan is never refused
        code, text = cli("infer", run, one, "--out", scans)
        assert code == 0 and "1 scans scored" in text, text


def test_run_and_result_folders_given_as_scans_are_refused(run, data, scans, tmp_path):
    results = tmp_path / "results"
    code, text = cli("infer", run, scans, "--out", results)
    assert code == 0, text
    one_error(*cli("infer", run, run, "--out", tmp_path / "a"), run, "is a medvq run folder, not scans")
    one_error(*cli("train", "vqvae", "--data", run, "--out", tmp_path / "b", *TINY), run, "is a medvq run folder, not a dataset")
    one_error(*cli("infer", run, results / "overlays", "--out", tmp_path / "c"), "is a folder of medvq results")
    overlay = next((results / "overlays").glob("*.png"))
    one_error(*cli("infer", run, overlay, "--out", tmp_path / "c"), overlay, "lies in a folder of medvq results")
    holder = tmp_path / "holder"
    shutil.copytree(results, holder / "results")
    error = one_error(*cli("infer", run, holder, "--out", tmp_path / "c"), holder, "no images in folder")
    assert "(results) are never read as scans" in error


def test_saturated_scan_is_skipped_and_counted(run, scans, tmp_path):
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(scans / "white.png")
    code, text = cli("infer", run, scans, "--out", tmp_path / "out")
    assert code == 0, text
    assert "white.png" in text and "1 scan(s) without any valid pixel skipped" in text
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 1 + 4


def test_training_skips_a_saturated_validation_normal(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(copy / "val" / "NORMAL" / "NORMAL-999-1.jpeg")
    code, text = cli("train", "vqvae", "--data", copy, "--out", tmp_path / "r", *TINY)
    assert code == 0, text
    assert "skipped 1 validation scan(s) without any valid pixel" in text
    assert (tmp_path / "r" / "calibration.json").is_file()


def test_demo_never_deletes_what_it_did_not_write(tmp_path):
    data = tmp_path / "demo" / "data"
    (data / "train" / "NORMAL").mkdir(parents=True)
    (data / "notes.txt").write_text("mine")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "train" / "NORMAL" / "NORMAL-1-1.jpeg")
    before = digest(tmp_path)
    code, text = cli("demo", "--out", tmp_path / "demo", "-n", "8", "--epochs", "1")
    one_error(code, text, data)
    assert digest(tmp_path) == before


def test_overwrite_interrupted_keeps_the_old_run_and_resume_finishes_it(run, data, tmp_path, monkeypatch):
    from medvq.models.vqvae.lightning import VQVAEModule

    old = copy_run(run, tmp_path)
    before = digest(old)
    original = VQVAEModule.training_step

    def ctrl_c_in_second_epoch(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(VQVAEModule, "training_step", ctrl_c_in_second_epoch)
    flags = [f for f in TINY]
    flags[flags.index("--epochs") + 1] = "2"
    code, text = cli("train", "vqvae", "--data", data, "--out", old, "--overwrite", *flags, "--codebook-size", "8")
    assert code == 130, text
    assert "interrupted after epoch 1; --resume continues" in text
    assert digest(old) == before, "the run being replaced is untouched until the new one is complete"
    monkeypatch.setattr(VQVAEModule, "training_step", original)
    code, text = cli("train", "vqvae", "--data", data, "--out", old, "--resume")
    assert code == 0, text
    assert yaml.safe_load((old / "config.yaml").read_text())["model"]["codebook_size"] == 8
    assert [line.split(",")[0] for line in (old / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert not (tmp_path / ".run-copy.partial").exists()


def test_resume_checks_data_and_checkpoint_before_writing(run, data, tmp_path):
    other_data = tmp_path / "other"
    shutil.copytree(data, other_data)
    for p in sorted((other_data / "train" / "NORMAL").glob("*.jpeg"))[:2]:
        p.unlink()
    copy = copy_run(run, tmp_path)
    before = digest(copy)
    code, text = cli("train", "vqvae", "--data", other_data, "--out", copy, "--resume", "--epochs", "2")
    one_error(code, text, other_data, str(data))
    assert digest(copy) == before
    ckpt = copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = digest(copy)
    code, text = cli("train", "vqvae", "--data", data, "--out", copy, "--resume", "--epochs", "2")
    one_error(code, text, ckpt)
    assert digest(copy) == before


def test_a_run_stopped_before_its_first_epoch_starts_again(run, data, tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(run / "config.yaml", stopped / "config.yaml")
    shutil.copy(run / "split.json", stopped / "split.json")
    code, text = cli("train", "vqvae", "--data", data, "--out", stopped, "--resume")
    assert "start it again without --resume" in one_error(code, text, stopped)
    code, text = cli("train", "vqvae", "--data", data, "--out", stopped, *TINY)
    assert code == 0, text
    assert (stopped / "calibration.json").is_file()


# --- damaged run folders and evaluation folders ---------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set_image_size(run: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["image_size"] = 64
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


RUN_DAMAGE = {
    "calibration.json truncated": ("calibration.json", lambda r: _truncate(r / "calibration.json")),
    "calibration.json without normal scores": ("calibration.json", lambda r: _edit_json(r / "calibration.json", lambda d: [s.update(normal_scores=[]) for s in d["stats"].values()])),
    "calibration.json missing": ("calibration", lambda r: (r / "calibration.json").unlink()),
    "image_size edited in config.yaml": ("calibration.json", _set_image_size),
    "config.yaml truncated to garbage": ("config.yaml", lambda r: (r / "config.yaml").write_text("data: [1, 2\n")),
    "best.safetensors truncated": ("best.safetensors", lambda r: _truncate(r / "model" / "best.safetensors")),
    "best.safetensors garbage": ("best.safetensors", lambda r: (r / "model" / "best.safetensors").write_bytes(b"\x00" * 64)),
    "split.json truncated (evaluate)": ("split.json", lambda r: _truncate(r / "split.json")),
}


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_damaged_run_folder_is_named(case, run, data, scans, tmp_path):
    named, damage = RUN_DAMAGE[case]
    copy = copy_run(run, tmp_path)
    damage(copy)
    before = digest(copy, scans)
    if "evaluate" in case:
        code, text = cli("evaluate", copy, "--data", data, "--out", tmp_path / "eval")
    else:
        code, text = cli("infer", copy, scans, "--out", tmp_path / "out")
    assert named in one_error(code, text, copy)
    assert digest(copy, scans) == before
    if "damaged" in text or "truncated" in case or "garbage" in case:
        assert "different configuration" not in text


@pytest.fixture(scope="module")
def evaluated(run, data) -> Path:
    out = data.parent / "eval"
    code, text = cli("evaluate", run, "--data", data, "--out", out)
    assert code == 0, text
    return out


@pytest.mark.parametrize("damage", ["metrics.json truncated", "metrics.json a list", "evaluation.npz truncated", "scores.csv missing"])
def test_report_on_damaged_evaluation_names_the_file(damage, evaluated, tmp_path):
    copy = tmp_path / "eval"
    shutil.copytree(evaluated, copy)
    name = damage.split()[0]
    if damage.endswith("truncated"):
        _truncate(copy / name)
    elif damage.endswith("a list"):
        (copy / name).write_text("[1, 2]")
    else:
        (copy / name).unlink()
    before = digest(copy)
    code, text = cli("report", copy)
    one_error(code, text, copy)
    assert digest(copy) == before
    code, text = cli("view", copy)  # the viewer reads scores.csv, metrics.json and maps.npz, not evaluation.npz
    if name == "evaluation.npz":
        assert code == 0 and (copy / "viewer.html").is_file(), text
    else:
        one_error(code, text, copy)
        assert digest(copy) == before


# --- outputs that cannot be written ---------------------------------------------------------------
def test_out_that_is_a_file_or_below_one(run, data, scans, tmp_path):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    cases = {
        "infer": lambda out: ("infer", run, scans, "--out", out),
        "evaluate": lambda out: ("evaluate", run, "--data", data, "--out", out),
        "explain": lambda out: ("explain", run, scans, "--out", out),
        "phantom": lambda out: ("phantom", "--out", out, "-n", "4", "--height", "64", "--width", "64"),
        "train": lambda out: ("train", "vqvae", "--data", data, "--out", out, *TINY),
        "benchmark": lambda out: ("benchmark", "--data", data, "--methods", "vqvae", "--out", out, "--epochs", "1"),
        "sample": lambda out: ("sample", run, "--out", out),
        "export": lambda out: ("export", run, "--out", out / "model.onnx"),
    }
    before = digest(tmp_path, run)
    for name, args in cases.items():
        for out in (blocker, blocker / "sub"):
            code, text = cli(*args(out))
            error = one_error(code, text, blocker if name != "explain" and name != "sample" else run)
            if name not in ("explain", "sample"):  # infer, evaluate, phantom, export said only '[Errno 17] File exists' or 'Not a directory'
                assert "file" in error and "[Errno" not in error and "Not a directory" not in error, error
    assert digest(tmp_path, run) == before


# --- flags checked before anything is written -------------------------------------------------------
@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--devices", "99"], "--devices 99"),
        (["--device", "gpu", "--devices", "99"], "--device"),
        (["--device", "tpu"], "unknown --device"),
        (["--strategy", "x"], "unknown --strategy"),
        (["--precision", "bf16-true"], "bf16-true"),
        (["--maps", "foo"], "foo"),
        (["--combine", "residual,bar"], "bar"),
        (["--devices", "two"], "--devices"),
    ],
)
def test_bad_training_flags_write_nothing(flags, expect, data, tmp_path):
    out = tmp_path / "run"
    before = digest(data)
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *TINY, *flags)
    assert code == 2 and expect in text, text
    assert not out.exists()
    assert digest(data) == before


@pytest.mark.parametrize("device", ["cuda:99", "tpu", "gpu:x"])
def test_scoring_on_a_missing_device_is_refused(device, run, scans, tmp_path):
    code, text = cli("infer", run, scans, "--out", tmp_path / "out", "--device", device)
    assert code == 2 and "--device" in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["classifier", "vqvae", "vqvae2"])
def test_colour_input_is_refused(method, data, tmp_path):
    code, text = cli("train", method, "--data", data, "--out", tmp_path / "c", "--in-channels", "3")
    assert code == 2 and "--in-channels 3" in text, text
    assert not (tmp_path / "c").exists()


def test_divergence_stops_at_once_and_keeps_nothing_broken(data, tmp_path):
    flags = [f for f in TINY]
    flags[flags.index("--epochs") + 1] = "3"
    out = tmp_path / "run"
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *flags, "--lr", "1e12", "--beta", "1e12")
    line = one_error(code, text, out)
    assert "step" in line and "learning rate" in line and "epoch" in line
    assert not (out / "calibration.json").exists()


def test_ctrl_c_before_the_first_epoch_then_the_same_command_starts_over(data, tmp_path, monkeypatch):
    from medvq.models.vqvae.lightning import VQVAEModule

    original = VQVAEModule.training_step

    def ctrl_c(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(VQVAEModule, "training_step", ctrl_c)
    out = tmp_path / "run"
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *TINY)
    assert code == 130 and "interrupted before the first epoch finished; run the same command again" in text, text
    monkeypatch.setattr(VQVAEModule, "training_step", original)
    code, text = cli("train", "vqvae", "--data", data, "--out", out, *TINY)
    assert code == 0, text


# --- bad scans and configs ----------------------------------------------------------------------
def _huge_png(path: Path) -> None:
    """A valid PNG header declaring 12000 x 12000 pixels (144 megapixels) in a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


BAD_SCANS = {
    "truncated.jpeg": lambda p, good: p.write_bytes(good.read_bytes()[:200]),
    "empty.jpeg": lambda p, good: p.write_bytes(b""),
    "text.jpeg": lambda p, good: p.write_text("not an image"),
    "huge.png": lambda p, good: _huge_png(p),
    "tiny.png": lambda p, good: Image.fromarray(np.zeros((4, 4), np.uint8)).save(p),
    "nan.nii.gz": lambda p, good: _nifti(p, np.full((16, 16, 4), np.nan, np.float32)),
    "garbage.dcm": lambda p, good: p.write_bytes(b"DICM" * 40),
    "garbage.tif": lambda p, good: p.write_bytes(b"II*\x00" + b"\xff" * 40),
}


def _nifti(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


@pytest.mark.parametrize("name", list(BAD_SCANS))
def test_bad_scan_is_named_by_infer_and_by_training(name, run, data, scans, tmp_path):
    good = next(scans.glob("*.jpeg"))
    BAD_SCANS[name](scans / name, good)
    before = digest(scans, run)
    code, text = cli("infer", run, scans / name, "--out", tmp_path / "alone")  # nothing readable: the file's own error
    one_error(code, text, name)
    code, text = cli("infer", run, scans, "--out", tmp_path / "out")
    if name.endswith(".nii.gz"):  # a volume is opened while the inputs are listed, before any scan is scored
        one_error(code, text, name)
    else:  # among readable scans: skipped and counted, the others scored
        assert code == 0, text
        assert "1 file(s) could not be read and were skipped; the first:" in " ".join(text.split()) and name in text
        assert len(list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))) == 4
    assert digest(scans, run) == before
    if name.endswith((".jpeg", ".png")):  # the same file among the training scans: named before any run file is written
        train_data = tmp_path / "data"
        shutil.copytree(data, train_data)
        shutil.copy(scans / name, train_data / "train" / "NORMAL" / f"NORMAL-77-1{Path(name).suffix}")
        code, text = cli("train", "vqvae", "--data", train_data, "--out", tmp_path / "r", *TINY)
        one_error(code, text, "NORMAL-77-1")
        assert not (tmp_path / "r").exists()


def test_config_with_python_tag_is_refused(data, tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    code, text = cli("train", "vqvae", "--data", data, "--out", tmp_path / "r", "--config", evil)
    one_error(code, text, evil)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_twelve_bit_png_uses_its_bit_depth(tmp_path):
    from medvq.data.readers import read_image

    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "scan12.png")
    with pytest.warns(UserWarning, match="12-bit"):
        image = read_image(tmp_path / "scan12.png")
    np.testing.assert_allclose(image, ramp / 4095.0, atol=1e-6)


# --- the Python API ---------------------------------------------------------------------------------
def test_api_validates_its_inputs(run, scans):
    import torch

    from medvq.detector import Detector
    from medvq.errors import ImageReadError, MedvqError

    det = Detector.load(run)
    with pytest.raises(MedvqError, match=r"\[0, 1\]"):
        det.predict(torch.full((1, 1, 32, 32), 200.0))
    with pytest.raises(ImageReadError, match="x.png: file not found"):
        det.predict_files("x.png")
    one = det.predict_files(str(next(scans.glob("*.jpeg"))))
    assert len(one) == 1 and np.isfinite(one[0].scores["combined"]["score"])


# --- masks only where there are lesions -----------------------------------------------------------
def test_pixel_metrics_need_masks_for_lesion_scans_only(run, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for p in (copy / "masks").rglob("NORMAL/*.png"):
        p.unlink()
    dropped = sorted((copy / "masks" / "test").rglob("CNV/*.png"))[0]
    dropped.unlink()
    code, text = cli("evaluate", run, "--data", copy, "--out", tmp_path / "eval")
    assert code == 0, text
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pixel_metric_left_out"] == 1
    assert metrics["pixel_metric_images"] == metrics["n_images"] - 1
    assert all("pixel_auroc" in m for m in metrics["maps"].values())
    assert "1 abnormal images without a mask were left out" in (tmp_path / "eval" / "report.html").read_text()


# --- explain ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_run(data) -> Path:
    out = data.parent / "vit"
    code, text = cli(
        "train", "classifier", "--data", data, "--out", out, "--arch", "vit", "--patch-size", "8", "--depth", "1", "--embed-dim", "16",
        "--num-heads", "1", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--min-images-per-epoch", "0",
        "--samples-per-epoch", "0", "--precision", "32",
    )
    assert code == 0, text
    return out


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--rollout-discard-ratio", "1.5"], "--rollout-discard-ratio"),
        (["--rollout-head-fusion", "median"], "--rollout-head-fusion"),
        (["--gradcam-layer", "x"], "no layer 'x'"),
        (["--map", "lime"], "unknown explanation map"),
        (["--discard-ratio", "1.5"], "--rollout-discard-ratio"),  # the flags' earlier names still work
        (["--method", "lime"], "unknown explanation map"),
    ],
)
def test_explain_names_bad_settings(flags, expect, vit_run, scans, tmp_path):
    before = digest(vit_run, scans)
    code, text = cli("explain", vit_run, scans, "--out", tmp_path / "x", *flags)
    line = one_error(code, text)
    assert expect in line and "pydantic" not in line and "http" not in line, line
    assert digest(vit_run, scans) == before


def test_explain_never_reads_its_own_outputs_back(vit_run, scans):
    for _ in range(2):
        code, text = cli("explain", vit_run, scans, "--out", scans / "why", "--map", "rollout")
        assert code == 0 and "4 scans explained" in text, text
