"""`medvq view`: the page built from a tiny evaluation and a tiny inference, driven in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvq.cli import app
from medvq.data.samples import dataset_splits
from medvq.evaluation.evaluate import evaluate_run
from tiny_runs import make_run

pytestmark = pytest.mark.slow
runner = CliRunner()
CHROMIUM = os.environ.get("MEDVQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def evaluation(tiny_phantom, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    normals = validation_normals(tiny_phantom)
    run = make_run("vqvae", root / "run", normals, data_root=tiny_phantom)
    out = root / "eval"
    evaluate_run(run.root, tiny_phantom, out, progress=False)
    result = runner.invoke(app, ["view", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"chromium not found at {CHROMIUM} (scripts/setup.sh --test installs Debian's chromium; or set MEDVQ_CHROMIUM)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def validation_normals(root: Path) -> list:
    val = dataset_splits(root, val_fraction=0.2, test_fraction=0.3, seed=0)["val"]
    return [s for s in val if s.label == "NORMAL"][:4]


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def shown_counts(page) -> dict[str, str]:
    return {el.get_attribute("data-count"): el.inner_text() for el in page.query_selector_all("#counts [data-count]")}


def expected_counts(scores_csv: Path, score: str, threshold: float, normal: str = "NORMAL") -> dict[str, int]:
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    with open(scores_csv, newline="") as f:
        for row in csv.DictReader(f):
            called, positive = float(row[score]) > threshold, row["class"] != normal
            c[("t" if called == positive else "f") + ("p" if called else "n")] += 1
    return c


def test_viewer_counts_maps_and_navigation_in_chromium(evaluation, browser):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    primary = metrics["primary_map"]
    with open(evaluation / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    page, errors = open_page(browser, evaluation / "viewer.html")

    # every scored scan is a card; the threshold starts at the stored one, with metrics.json's counts
    assert len(page.query_selector_all("#grid .card")) == len(rows)
    assert float(page.get_attribute("#threshold-value", "data-value")) == pytest.approx(metrics["maps"][primary]["operating_point"]["threshold"])
    stored = metrics["maps"][primary]["operating_point"]["confusion"]
    assert {k: int(v) for k, v in shown_counts(page).items() if k in stored} == stored

    # a click opens the scan at full resolution with the primary map over it
    page.click("#grid .card >> nth=0")
    page.wait_for_function("document.getElementById('c-map').dataset.map !== undefined")
    first = page.inner_text("#d-name")
    width = page.evaluate("document.getElementById('c-scan').width")
    assert width == 128  # the phantom scans' own width, not the 64 px model grid
    alpha = "(() => { const c = document.getElementById('c-map'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;" \
            " let s = 0; for (let k = 3; k < d.length; k += 4) s += d[k] > 0; return s; })()"
    painted = page.evaluate(alpha)
    assert painted > 0
    # toggle to another map: the overlay is redrawn from that map
    other = next(n for n in ("alm", "combined", "residual") if n != page.eval_on_selector("#d-map", "e => e.value"))
    page.select_option("#d-map", other)
    page.wait_for_function(f"document.getElementById('c-map').dataset.map === '{other}'")
    page.fill("#d-opacity", "25")
    assert page.eval_on_selector("#c-map", "e => e.style.opacity") == "0.25"
    assert page.is_visible("#recon") and page.is_visible("#colorbar")
    # keyboard: next scan (arrow keys belong to a focused slider, so focus leaves it first)
    page.click("#d-name")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"document.getElementById('d-name').textContent !== {json.dumps(first)}")
    page.keyboard.press("Escape")
    assert not page.is_visible("#detail")
    # closed while a scan is still loading (its image arrives in a later task): nothing is drawn, no error
    page.evaluate("document.querySelector('#grid .card').click(); document.getElementById('close').click()")
    page.wait_for_timeout(300)
    assert not page.is_visible("#detail") and errors == []

    # move the threshold slider with the keyboard: the shown counts follow scores.csv at the shown threshold
    page.focus("#threshold")
    for _ in range(120):
        page.keyboard.press("ArrowLeft")
    t = float(page.get_attribute("#threshold-value", "data-value"))
    assert t < metrics["maps"][primary]["operating_point"]["threshold"]
    want = expected_counts(evaluation / "scores.csv", primary, t)
    got = shown_counts(page)
    assert {k: int(got[k]) for k in want} == want
    sens = want["tp"] / (want["tp"] + want["fn"])
    assert float(got["sensitivity"]) == pytest.approx(sens, abs=1e-3)
    cx = float(page.get_attribute("#roc-point", "cx"))
    assert cx == pytest.approx(5 + 100 * want["fp"] / (want["fp"] + want["tn"]), abs=1e-6)

    # sort and filter
    page.select_option("#sort", "name")
    names = [n.inner_text() for n in page.query_selector_all("#grid .card .nm")]
    assert names == sorted(names, reverse=True)
    page.select_option("#filter-class", "CNV")
    classes = {n.inner_text() for n in page.query_selector_all("#grid .card .cl")}
    assert classes == {"CNV"}
    page.select_option("#filter-decision", "abnormal")
    shown = len(page.query_selector_all("#grid .card"))
    assert shown == sum(1 for r in rows if r["class"] == "CNV" and float(r[primary]) > t)
    assert errors == []


def test_viewer_of_an_inference_with_a_volume(tiny_phantom, nibabel_data, browser, tmp_path):
    """Unlabelled scans: counts of calls at the stored threshold; a NIfTI volume gets a B-scan slider and its en-face map."""
    normals = validation_normals(tiny_phantom)
    run = make_run("vqvae", tmp_path / "run", normals)
    scans = sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:3]
    out = tmp_path / "infer"
    result = runner.invoke(app, ["infer", str(run.root), *map(str, scans), str(nibabel_data / "anatomical.nii"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["view", str(out), "--beside"])
    assert result.exit_code == 0, result.output
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    page, errors = open_page(browser, out / "viewer.html")
    got = shown_counts(page)
    assert int(got["abnormal"]) == sum(r["abnormal"] == "1" for r in rows)
    assert int(got["normal"]) == sum(r["abnormal"] == "0" for r in rows)
    frames = sorted((int(r["frame"]), i) for i, r in enumerate(rows) if r.get("frame") not in (None, ""))
    assert len(frames) > 1
    page.click(f"#grid .card[data-i='{frames[-1][1]}']")
    page.wait_for_selector("#bscan")
    assert page.is_visible("#enface")
    page.wait_for_function("document.getElementById('enface').complete && document.getElementById('enface').naturalWidth > 0")
    widths = page.evaluate("[document.getElementById('enface').getBoundingClientRect().width, document.getElementById('enface-line').getBoundingClientRect().width]")
    assert widths[1] == pytest.approx(widths[0], abs=1)  # the B-scan line spans the en-face map, not the panel (it did)
    page.fill("#bscan", "0")  # the slider walks the volume's B-scans in order
    page.wait_for_function(f"document.getElementById('d-name').textContent === {json.dumps(rows[frames[0][1]]['name'])}")
    assert (out / "viewer_files").is_dir()
    assert errors == []


def test_scans_gone_since_scoring_are_shown_blank_and_counted(tiny_phantom, tmp_path):
    """One scan moved away after `medvq infer` made the whole page fail; now only when every scan is gone."""
    run = make_run("vqvae", tmp_path / "run", validation_normals(tiny_phantom))
    scans = tmp_path / "scans"
    scans.mkdir()
    for p in sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:3]:
        shutil.copy(p, scans / p.name)
    out = tmp_path / "infer"
    assert runner.invoke(app, ["infer", str(run.root), str(scans), "--out", str(out), "--no-overlays"]).exit_code == 0
    gone = sorted(scans.glob("*.jpeg"))[0]
    gone.unlink()
    result = runner.invoke(app, ["view", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 of 3 scans named in scores.csv are missing" in " ".join(result.output.split()) and gone.name in result.output
    assert (out / "viewer.html").read_text().count('"missing":true') == 1
    for p in scans.glob("*.jpeg"):
        p.unlink()
    result = runner.invoke(app, ["view", str(out)])
    assert result.exit_code == 2 and "is missing" in result.output and "Traceback" not in result.output


def test_view_refuses_a_folder_without_scores(tmp_path):
    result = runner.invoke(app, ["view", str(tmp_path)])
    assert result.exit_code == 2 and "no scores.csv" in result.output and "Traceback" not in result.output


def test_scan_paths_relative_to_where_evaluate_ran_are_found_under_the_data_root(tmp_path):
    from medvq.report.viewer import locate

    scan = tmp_path / "data" / "test" / "CNV" / "CNV-1-1.jpeg"
    scan.parent.mkdir(parents=True)
    scan.write_bytes(b"")
    assert locate(Path("data/test/CNV/CNV-1-1.jpeg"), tmp_path / "data") == scan
    assert locate(Path("../elsewhere/data/test/CNV/CNV-1-1.jpeg"), tmp_path / "data") == scan
    assert locate(Path("test/CNV/missing.jpeg"), tmp_path / "data") == Path("test/CNV/missing.jpeg")


def test_scans_of_an_inference_are_found_from_another_working_folder(tmp_path):
    """`medvq infer RUN scans --out results/today` in one folder, `medvq view` from another: the relative
    scan paths of scores.csv were looked up only where view ran, so every scan was 'missing'."""
    from medvq.report.viewer import locate

    scan = tmp_path / "scans" / "a.jpeg"
    scan.parent.mkdir()
    scan.write_bytes(b"")
    results = tmp_path / "results" / "today"
    results.mkdir(parents=True)
    assert locate(Path("scans/a.jpeg"), None, results) == tmp_path / "scans" / "a.jpeg"
    assert locate(Path("scans/b.jpeg"), None, results) == Path("scans/b.jpeg")  # not anywhere: left as it was, and named as missing
