"""The benchmark page: one self-contained HTML file from the content of benchmark.json.

The table of ``medvq.evaluation.benchmark``, a chart of image AUROC per method and score, the cost of
every run (time, memory, load average) and links to each run's own evaluation report.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medvq.report.html import CSS, _fig_png  # noqa: E402


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
    from medvq.evaluation.benchmark import _fmt, _training, table_columns

    rows = result["rows"]
    cols = table_columns(rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in cols)
    body = []
    for r in rows:
        cells = "".join(f"<td>{html.escape(_fmt(get(r), digits))}</td>" for _, get, digits in cols)
        body.append(f"<tr><td class='l'>{html.escape(r['method'])}</td><td class='l'>{html.escape(r['score'])}</td><td class='l'>{html.escape(_training(r))}</td>{cells}</tr>")
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
    from medvq.evaluation.benchmark import describe

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
