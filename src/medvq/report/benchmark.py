"""The benchmark's tables and page, from the content of benchmark.json: the markdown and CSV tables and one
self-contained HTML file (``medvq.evaluation.benchmark`` runs the benchmark and writes them).

The table, a chart of image AUROC per method and score, the cost of
every run (time, memory, load average) and links to each run's own evaluation report.
"""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medvq.report.html import CSS, _fig_png  # noqa: E402

SPEC_KEY = "sensitivity_at_95_specificity"
# (column label, metrics.json key) of the image-level and pixel-level columns, in table order
IMAGE_COLUMNS = [("image AUROC", "image_auroc"), ("AUPRC", "image_auprc"), ("sens. @95% spec.", SPEC_KEY)]
PIXEL_COLUMNS = [("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"), ("Dice", "dice")]
COST_COLUMNS = [("train s", "train_seconds"), ("infer img/s", "inference_images_per_second"), ("train peak MB", "train_peak_mb"), ("infer peak MB", "inference_peak_mb")]


# --- the table --------------------------------------------------------------------------------------
def format_stat(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def table_columns(rows: list[dict]) -> list[tuple[str, Any, int]]:
    """(label, getter, digits) of every column the rows can fill."""
    classes = sorted({c for r in rows for c in r["image_auroc_per_class"]})
    widths = sorted({w for r in rows for w in r["image_auroc_by_width"]}, key=lambda w: (not w.isdigit(), int(w) if w.isdigit() else 0, w))
    cols: list[tuple[str, Any, int]] = [("image AUROC", lambda r: r["image_auroc"], 3)]
    cols += [(f"AUROC {c}", (lambda c: lambda r: r["image_auroc_per_class"].get(c))(c), 3) for c in classes]
    cols += [(f"AUROC {w}px-wide", (lambda w: lambda r: r["image_auroc_by_width"].get(w))(w), 3) for w in widths]
    cols += [(label, (lambda k: lambda r: r[k])(key), 3) for label, key in IMAGE_COLUMNS[1:]]
    cols += [(label, (lambda k: lambda r: r[k])(key), 3) for label, key in PIXEL_COLUMNS if any(r[key] for r in rows)]
    cols += [(label, (lambda k: lambda r: r[k])(key), 1) for label, key in COST_COLUMNS]
    return cols


def training_label(row: dict) -> str:
    return "supervised (labelled training patients)" if row["supervised"] else "normal scans only"


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    cols = table_columns(rows)
    head = ["method", "score", "training", *[c[0] for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(cols)) + "|"]
    for r in rows:
        cells = [r["method"], r["score"], training_label(r), *[format_stat(get(r), digits) for _, get, digits in cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(result: dict) -> str:
    """The facts a reader needs next to the table: data, split, seeds, machine, load."""
    runs = result["runs"]
    counts = ", ".join(f"{c} {n}" for c, n in result["test_counts"].items())
    loads = [v for r in runs for stage in ("train", "inference") for v in (r[stage]["load_1min_before"], r[stage]["load_1min_after"])]
    env = result["environment"]
    machine = f"{env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']} threads)" + (f", GPU {env['cuda']}" if env["cuda"] else "")
    sizes = sorted({r["image_size"] for r in runs})
    return (
        f"Data `{result['data']}`: {result['test_images']} test images ({counts}) of {result['test_patients']} test patients, "
        f"the same for every method; image size {', '.join(f'{s} px' for s in sizes)}; "
        f"seed(s) {', '.join(map(str, result['seeds']))}" + (" (mean ± standard deviation over seeds)" if len(result["seeds"]) > 1 else "") + ". "
        f"Unsupervised methods train on the NORMAL scans of the training patients; supervised ones on every labelled scan of them. "
        f"Image scores are top-1 % means of calibrated maps unless the score is the model's own (e.g. `reweighted_max`, `p_abnormal`). "
        f"Machine: {machine}; 1-minute load average during the timed stages {min(loads):.1f}–{max(loads):.1f} "
        f"(above the CPU count means other jobs shared the machine). Peak MB: the process's peak resident memory during the stage."
    )


def csv_table(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    rows = result["rows"]
    cols = table_columns(rows)
    header = ["method", "score", "supervised", "image_size", "seeds"]
    for label, _, _ in cols:
        header += [f"{label} mean", f"{label} std"]
    writer.writerow(header)
    for r in rows:
        cells = [r["method"], r["score"], r["supervised"], r["image_size"], len(r["seeds"])]
        for _, get, _ in cols:
            s = get(r)
            cells += [f"{s['mean']:.6g}", f"{s['std']:.6g}"] if s else ["", ""]
        writer.writerow(cells)
    return buffer.getvalue()


def _auroc_chart(rows: list[dict]) -> str:
    labels = [f"{r['method']}\n{r['score']}" for r in rows]
    means = [r["image_auroc"]["mean"] if r["image_auroc"] else float("nan") for r in rows]
    stds = [r["image_auroc"]["std"] if r["image_auroc"] else 0.0 for r in rows]
    colors = ["#c77" if r["supervised"] else "#58a" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1), 3.2))
    ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("image AUROC (pooled)")
    ax.set_title("blue: normal scans only; red: supervised", fontsize=8)
    return f"<img alt='image AUROC per method' src='{_fig_png(fig)}'>"


def _table(result: dict) -> str:
    rows = result["rows"]
    cols = table_columns(rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in cols)
    body = []
    for r in rows:
        cells = "".join(f"<td>{html.escape(format_stat(get(r), digits))}</td>" for _, get, digits in cols)
        body.append(f"<tr><td class='l'>{html.escape(r['method'])}</td><td class='l'>{html.escape(r['score'])}</td><td class='l'>{html.escape(training_label(r))}</td>{cells}</tr>")
    return f"<table><tr><th class='l'>method</th><th class='l'>score</th><th class='l'>training</th>{head}</tr>{''.join(body)}</table>"


def _runs(result: dict, out: Path) -> str:
    head = "<tr><th class='l'>run</th><th>train images</th><th>train s</th><th>train peak MB</th><th>infer img/s</th><th>infer peak MB</th><th>load before → after</th><th class='l'>notes</th><th class='l'>report</th></tr>"
    body = []
    for r in result["runs"]:
        t, i = r["train"], r["inference"]
        notes = []
        if "fit" in r:
            f = r["fit"]
            notes.append(f"memory bank {f['memory_bank']} of {f['patches']} patches; features {f['feature_seconds']:.1f}s, coreset {f['coreset_seconds']:.1f}s")
        if "classification" in r:
            notes.append(", ".join(f"{k} {v:.3f}" for k, v in r["classification"].items()))
        report = Path(r["run"]) / "eval" / "report.html"
        link = os.path.relpath(report, out) if report.is_file() else ""
        body.append(
            f"<tr><td class='l'>{html.escape(r['method'])} seed {r['seed']}</td><td>{r['train_images']}</td><td>{t['seconds']:.1f}</td><td>{t['peak_rss_mb']:.0f}</td>"
            f"<td>{i['images_per_second']:.1f}</td><td>{i['peak_rss_mb']:.0f}</td>"
            f"<td>{t['load_1min_before']:.1f} → {i['load_1min_after']:.1f}</td><td class='l'>{html.escape('; '.join(notes))}</td>"
            f"<td class='l'>{f'<a href={html.escape(link)!r}>report</a>' if link else '–'}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def benchmark_page(result: dict, out: str | Path) -> str:
    out = Path(out)
    title = f"medvq benchmark: {', '.join(result['methods'])}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(result['started'])} – {html.escape(result['finished'])}</p>"
        f"<p>{html.escape(describe(result))}</p>"
        f"<h2>Results</h2>{_table(result)}{_auroc_chart(result['rows'])}"
        "<p class='muted'>AUROC per class: that class against NORMAL. AUROC per width: within scans of one original width only "
        "(widths holding at least two normal and two abnormal test scans), a guard against detectors that read the scan width. "
        "Pixel metrics only where lesion masks exist; Dice is the best over thresholds (an upper bound).</p>"
        f"<h2>Runs</h2>{_runs(result, out)}"
        "</body></html>"
    )
