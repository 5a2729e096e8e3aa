"""The evaluation report: one self-contained HTML page built only from saved outputs.

``build_report(DIR)`` reads DIR/metrics.json, DIR/scores.csv and DIR/evaluation.npz, so a report can be
rebuilt (``medvq report DIR``) without running a model again; for a ``medvq sample`` folder it reads
samples.json, codes.npy and the sample images.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from medvq.errors import MedvqError  # noqa: E402
from medvq.io import atomic_write_text, mark_output  # noqa: E402
from medvq.report.figures import colorize, overlay  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1180px;color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0;max-width:100%} th,td{border:1px solid #ddd;padding:.25rem .4rem;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .muted{color:#666;font-size:.85rem}
.best{font-weight:bold;background:#eef7ee} .ci{color:#666;font-size:.72rem;white-space:nowrap} .warn{color:#b35900;font-size:.72rem}
.gal{width:100%;table-layout:fixed} .gal td{padding:2px;border:none;text-align:center;font-size:.72rem;vertical-align:top;overflow-wrap:anywhere}
.gal img{width:100%;max-width:132px;height:auto;image-rendering:pixelated;display:block;margin:auto} figure{display:inline-block;margin:.3rem}
.bar{width:100%;max-width:132px;height:8px;display:block;margin:2px auto 0} .bar+span{display:flex;justify-content:space-between;max-width:132px;margin:auto;font-weight:normal}
img.fig{max-width:100%;height:auto} pre{font-size:.72rem;background:#f7f7f7;padding:.5rem;overflow-x:auto;max-width:100%}
"""


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(fig, out: Path, name: str) -> str:
    """Save a figure as OUT/figures/NAME.svg and .png (for papers) and return the PNG for the page."""
    from medvq.io import atomic_path

    folder = out / "figures"
    mark_output(folder)  # figure PNGs are never read back as scans
    for ext in ("svg", "png"):
        with atomic_path(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
    return _fig_png(fig)


def _colour_bar(vmax: float, cmap: str = "inferno") -> str:
    """A horizontal colour bar from 0 to vmax, for a gallery column header."""
    strip = colorize(np.linspace(0, vmax, 128)[None].repeat(6, axis=0), 0.0, vmax, cmap)
    return f"<img class='bar' src='{_png(strip)}' alt='colour scale'><span><span>0</span><span>{vmax:.2g}</span></span>"


def _gray(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


def _outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(_gray(image)[..., None], 3, axis=2)
    edge = mask & ~ndimage.binary_erosion(mask)
    rgb[edge] = (0, 255, 0)
    return rgb


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def read_scores(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fixed = {"path", "frame", "class", "patient", "width", "height", "in_distribution", "ood_distance"}
    names = [k for k in (rows[0].keys() if rows else []) if k not in fixed]
    return rows, names


def _interval_note(m: dict, key) -> str:
    """An AUROC cell's 95 % bootstrap interval by patient, and a flag when too few abnormal scans stand behind it."""
    if key in ("image_auroc", "pixel_auroc"):
        ci, flag = m.get(f"{key}_ci"), ""
    elif isinstance(key, tuple) and key[0] == "per_class":
        ci = m.get("image_auroc_per_class_ci", {}).get(key[1])
        n = m.get("n_abnormal_per_class", {}).get(key[1])
        flag = f"<br><span class='warn'>only {n} abnormal: unreliable</span>" if key[1] in m.get("unreliable_classes", []) else ""
    else:
        return ""
    return (f"<br><span class='ci'>{ci[0]:.2f}–{ci[1]:.2f}</span>" if ci else "") + flag


def _metrics_table(metrics: dict) -> str:
    maps = metrics["maps"]
    classes = sorted({c for m in maps.values() for c in m.get("image_auroc_per_class", {})})
    pixel = any("pixel_auroc" in m for m in maps.values())
    spec_key = next((k for k in next(iter(maps.values())) if k.startswith("sensitivity_at")), None)
    cols = [("image AUROC", "image_auroc"), ("AUPRC", "image_auprc")]
    if spec_key:
        cols.append(("sens. @95% spec.", spec_key))
    point = metrics.get("operating_point")
    if point:  # the stored threshold, chosen on calibration normals only: the honest operating point
        cols += [(f"sens. @ stored {point}", ("operating_point", "sensitivity")), (f"spec. @ stored {point}", ("operating_point", "specificity"))]
    cols += [(f"AUROC {c}", ("per_class", c)) for c in classes]
    if pixel:
        cols += [("pixel AUROC", "pixel_auroc"), ("AUPRO (FPR≤0.3)", "aupro"), ("best Dice", "dice")]
        if any("pointing_game" in m for m in maps.values()):
            cols.append(("pointing game", "pointing_game"))
    value = lambda m, key: (m.get("image_auroc_per_class" if key[0] == "per_class" else key[0]) or {}).get(key[1]) if isinstance(key, tuple) else m.get(key)
    best = {label: max((value(m, key) or -1) for m in maps.values()) for label, key in cols}
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in cols)
    rows = []
    for name, m in maps.items():
        cells = "".join(
            f"<td class='{'best' if value(m, key) is not None and value(m, key) == best[label] else ''}'>{_fmt(value(m, key))}{_interval_note(m, key)}</td>"
            for label, key in cols
        )
        rows.append(f"<tr><td class='l'>{html.escape(name)}</td>{cells}</tr>")
    table = f"<table><tr><th class='l'>map</th>{head}</tr>{''.join(rows)}</table>"
    if any("image_auroc_ci" in m for m in maps.values()):
        pixel_by = next((m["pixel_auroc_ci_by"] for m in maps.values() if "pixel_auroc_ci_by" in m), "patient")
        resampled = "patients" if pixel_by == "patient" else "patients (pixel AUROC: images, the data has no patient ids)"
        table += f"<p class='muted'>Under each AUROC: its 95 % bootstrap interval, resampling {resampled} (1,000 resamples).</p>"

    widths = sorted({w for m in maps.values() for w in m.get("image_auroc_by_width", {})}, key=lambda w: int(w) if w.isdigit() else w)
    if widths:
        head = "".join(f"<th>{html.escape(w)} px</th>" for w in widths)
        rows = "".join(
            f"<tr><td class='l'>{html.escape(n)}</td>" + "".join(f"<td>{_fmt(m.get('image_auroc_by_width', {}).get(w))}</td>" for w in widths) + "</tr>"
            for n, m in maps.items()
        )
        table += (
            "<p class='muted'>Image AUROC within scans of one original width (only widths holding both normal and abnormal scans). "
            "A pooled AUROC far above these would mean the model reads the scan width rather than the retina.</p>"
            f"<table><tr><th class='l'>map</th>{head}</tr>{rows}</table>"
        )
    return table


def _classification_section(c: dict) -> str:
    """Accuracy, balanced accuracy, AUROC, per-class sensitivity/specificity and the confusion matrix of a classifier."""
    names = c["classes"]
    head = [("accuracy", c["accuracy"]), ("balanced accuracy", c["balanced_accuracy"]), ("AUROC normal vs abnormal", c["auroc_abnormal"])]
    if "auroc_macro" in c:
        head.append(("AUROC macro (one vs rest)", c["auroc_macro"]))
    top = "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k, _ in head) + "</tr><tr>" + "".join(f"<td>{_fmt(v)}</td>" for _, v in head) + "</tr></table>"
    ovr = c.get("auroc_one_vs_rest", {})
    per_class = "<table><tr><th class='l'>class</th><th>sensitivity</th><th>specificity</th>" + ("<th>AUROC (one vs rest)</th>" if ovr else "") + "</tr>"
    for n in names:
        per_class += f"<tr><td class='l'>{html.escape(n)}</td><td>{_fmt(c['sensitivity'][n])}</td><td>{_fmt(c['specificity'][n])}</td>"
        per_class += (f"<td>{_fmt(ovr.get(n))}</td>" if ovr else "") + "</tr>"
    per_class += "</table>"
    cm = "<table><tr><th class='l'>true \\ predicted</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    for n, row in zip(names, c["confusion_matrix"]):
        cm += f"<tr><td class='l'>{html.escape(n)}</td>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
    cm += "</table>"
    extra = ""
    if c.get("called_abnormal_per_label"):
        extra += "<p class='muted'>Share of each class folder's images called abnormal: " + ", ".join(
            f"{html.escape(k)} {v:.3f}" for k, v in c["called_abnormal_per_label"].items()
        ) + "</p>"
    if c.get("auroc_abnormal_by_width"):
        extra += "<p class='muted'>AUROC of P(abnormal) within one original scan width: " + ", ".join(
            f"{html.escape(k)} px {_fmt(v)}" for k, v in c["auroc_abnormal_by_width"].items()
        ) + "</p>"
    return top + per_class + "<p class='muted'>Confusion matrix (rows: true class, columns: predicted class, argmax of the probabilities).</p>" + cm + extra


def _operating_point_section(metrics: dict) -> str:
    """Confusion matrix of every map at its stored threshold."""
    point = metrics.get("operating_point")
    maps = {n: m["operating_point"] for n, m in metrics["maps"].items() if "operating_point" in m}
    if not point or not maps:
        return ""
    rows = "".join(
        f"<tr><td class='l'>{html.escape(n)}{' (primary)' if n == metrics.get('primary_map') else ''}</td><td>{op['threshold']:.3g}</td>"
        f"<td>{op['calibration_normals']}{'' if op['reliable'] else ' (too few)'}</td><td>{op['confusion']['tn']}</td><td>{op['confusion']['fp']}</td>"
        f"<td>{op['confusion']['fn']}</td><td>{op['confusion']['tp']}</td><td>{_fmt(op['sensitivity'])}</td><td>{_fmt(op['specificity'])}</td></tr>"
        for n, op in maps.items()
    )
    return (
        f"<h2>Operating point ({html.escape(point)}, stored at calibration)</h2>"
        f"<p class='muted'>Each map's threshold at {html.escape(point[4:])} % specificity on the held-out calibration normals, fixed before "
        "these test scans were seen; a scan is called abnormal above it. Marked ● on the ROC curves.</p>"
        "<table><tr><th class='l'>map</th><th>threshold</th><th>calibration normals</th><th>TN</th><th>FP</th><th>FN</th><th>TP</th>"
        f"<th>sensitivity</th><th>specificity</th></tr>{rows}</table>"
    )


def _volume_section(metrics: dict) -> str:
    """Volume-level figures next to the B-scan ones, where the test data holds volumes."""
    volumes = metrics.get("volume_level")
    if not volumes:
        return ""
    counts = ", ".join(f"{html.escape(c)} {n}" for c, n in volumes["counts"].items())
    rows = "".join(
        f"<tr><td class='l'>{html.escape(n)}</td><td>{_fmt(metrics['maps'][n]['image_auroc'])}{_interval_note(metrics['maps'][n], 'image_auroc')}</td>"
        f"<td>{_fmt(v['auroc'])}{_interval_note({'image_auroc_ci': v.get('auroc_ci')}, 'image_auroc')}</td><td>{_fmt(v['auprc'])}</td>"
        + (f"<td>{_fmt(v['operating_point']['sensitivity'])}</td><td>{_fmt(v['operating_point']['specificity'])}</td>" if "operating_point" in v else "<td>–</td><td>–</td>")
        + "</tr>"
        for n, v in volumes["maps"].items()
        if n in metrics["maps"]
    )
    return (
        f"<h2>Volumes</h2><p class='muted'>{volumes['n_volumes']} volumes ({counts}); a volume is abnormal when any of its B-scans is; "
        f"its score: {html.escape(volumes['aggregation'])}; called abnormal above the B-scan threshold. "
        "Under each AUROC: its 95 % bootstrap interval, resampling patients.</p>"
        "<table><tr><th class='l'>map</th><th>B-scan AUROC</th><th>volume AUROC</th><th>volume AUPRC</th><th>volume sensitivity</th><th>volume specificity</th></tr>"
        f"{rows}</table>"
    )


def _roc_section(rows: list[dict], names: list[str], normal: str, metrics: dict, out: Path) -> str:
    labels = np.array([r["class"] != normal for r in rows], dtype=int)
    classes = sorted({r["class"] for r in rows} - {normal})
    points = {n: m["operating_point"]["threshold"] for n, m in metrics["maps"].items() if "operating_point" in m}
    panels = [("all abnormal vs " + normal, np.ones(len(rows), bool), None)] + [
        (f"{c} vs {normal}", np.array([r["class"] in (c, normal) for r in rows]), c) for c in classes
    ]
    columns = min(2, len(panels))
    n_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.3 * columns, 4.1 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, keep, cls) in zip(axes.flat, panels):
        y = labels[keep]
        for n in names:
            s = np.array([float(r[n]) for r in rows])[keep]
            if y.min() == y.max():
                continue
            m = metrics["maps"].get(n, {})
            auc = m.get("image_auroc") if cls is None else m.get("image_auroc_per_class", {}).get(cls)
            ci = m.get("image_auroc_ci") if cls is None else m.get("image_auroc_per_class_ci", {}).get(cls)
            label = n + (f"  {auc:.3f}" if auc is not None else "") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            fpr, tpr, _ = roc_curve(y, s)
            (line,) = ax.plot(fpr, tpr, label=label, lw=1.5)
            if n in points:  # the stored operating point on these scans
                called = s > points[n]
                ax.plot([called[y == 0].mean()], [called[y == 1].mean()], "o", color=line.get_color(), ms=6, mec="black", mew=0.6)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="gray")
        n_abnormal = int(y.sum())
        ax.set_title(f"{title} ({n_abnormal} abnormal, {int((1 - y).sum())} normal)", fontsize=10)
        ax.set_xlabel("false positive rate (1 - specificity)", fontsize=10)
        ax.set_ylabel("true positive rate (sensitivity)", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="AUROC [95 % CI, by patient]", title_fontsize=8)
    fig.tight_layout()
    note = (
        "<p class='muted'>Legends: AUROC with its 95 % bootstrap interval by patient. ● the stored operating point "
        f"({html.escape(str(metrics.get('operating_point', '')))}, threshold fixed at calibration) on these scans. "
        "Also saved as figures/roc.svg and figures/roc.png.</p>"
        if points
        else ""
    )
    return f"<img class='fig' src='{_figure(fig, out, 'roc')}' alt='ROC curves'>{note}"


def _gallery_rows(npz: dict, rows_to_show, names: list[str], key: str, vmax: dict[str, float], show_class: bool = False) -> str:
    """One table row per gallery entry: input, reconstruction, every map, the overlay of ``key``, the mask."""
    has_mask, has_recon = "mask" in npz, "reconstruction" in npz
    extra_scores = [k.removeprefix("score_") for k in npz if k.startswith("score_") and k.removeprefix("score_") not in (*names, key)]
    out = []
    for i in rows_to_show:
        image = npz["image"][i]
        cells = [_png(_gray(image)), *([_png(_gray(npz["reconstruction"][i]))] if has_recon else [])]
        cells += [_png(colorize(npz[f"map_{n}"][i], 0.0, max(vmax[n], 1e-6))) for n in names]
        if key in names:
            cells.append(_png(overlay(image, npz[f"map_{key}"][i], 0.0, max(vmax[key], 1e-6))))
        if has_mask:
            cells.append(_png(_outline(image, npz["mask"][i].astype(bool))))
        name = Path(str(npz["paths"][i])).name
        label = f"<b>{html.escape(str(npz['labels'][i]))}</b><br>" if show_class else ""
        out.append(
            "<tr>" + "".join(f"<td><img src='{src}'></td>" for src in cells)
            + f"<td class='l'>{label}{html.escape(name)}<br>{html.escape(key)} {float(npz[f'score_{key}'][i]):.2f}"
            + "".join(f"<br>{html.escape(k)} {float(npz[f'score_{k}'][i]):.3f}" for k in extra_scores)
            + "</td></tr>"
        )
    return "".join(out)


def _gallery_header(npz: dict, names: list[str], key: str, vmax: dict[str, float]) -> str:
    cells = ["<b>input</b>", *(["<b>reconstruction</b>"] if "reconstruction" in npz else [])]
    cells += [f"<b>{html.escape(n)}</b>{_colour_bar(vmax[n])}" for n in names]
    if key in names:
        cells.append(f"<b>overlay ({html.escape(key)})</b>{_colour_bar(vmax[key], 'jet')}")
    if "mask" in npz:
        cells.append("<b>lesion mask</b>")
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "<td></td></tr>"


def _gallery(npz: dict, normal: str) -> str:
    names = [str(n) for n in npz["map_names"]]
    vmax = dict(zip(names, npz["map_vmax"].astype(float)))
    key = str(npz["primary_map"]) if "primary_map" in npz else ("combined" if "combined" in names else names[0])
    overlay_key = key if key in names else names[0]
    labels = [str(x) for x in npz["labels"]]
    class_rows = npz["class_rows"].tolist() if "class_rows" in npz else list(range(len(labels)))
    header = _gallery_header(npz, names, overlay_key, vmax)
    parts = []
    for c in sorted({labels[i] for i in class_rows}, key=lambda c: (c != normal, c)):
        rows = _gallery_rows(npz, [i for i in class_rows if labels[i] == c], names, key if f"score_{key}" in npz else overlay_key, vmax)
        parts.append(f"<h3>{html.escape(c)}</h3><table class='gal'>{header}{rows}</table>")
    note = (
        "<p class='muted'>Maps are standardised with statistics of held-out normal scans (0 = the normal mean, units: standard deviations of "
        "normal pixels; colour scale from 0 to the 99.5th percentile of each map over the test set, the same for every image, shown under "
        f"each column's name). Images are shown per class from the highest to the lowest {html.escape(key)} score (the run's primary map).</p>"
    )
    hard = ""
    for rows_key, title, text in (
        ("hard_normal_rows", f"Highest-scoring {normal} scans", "the normal test scans the primary map finds most abnormal: false alarms at a strict threshold"),
        ("hard_abnormal_rows", "Lowest-scoring abnormal scans", "the abnormal test scans the primary map finds most normal: the lesions it misses first"),
    ):
        if rows_key in npz and len(npz[rows_key]):
            rows = _gallery_rows(npz, npz[rows_key].tolist(), names, key, vmax, show_class=True)
            hard += f"<h2>{html.escape(title)}</h2><p class='muted'>By {html.escape(key)} score: {text}.</p><table class='gal'>{header}{rows}</table>"
    return note + "".join(parts) + hard


def _decision_summary(metrics: dict) -> str:
    """The primary map and why, and what the out-of-distribution guard said about these scans."""
    parts = []
    if metrics.get("primary_map"):
        parts.append(f"Primary map: <b>{html.escape(metrics['primary_map'])}</b> ({html.escape(metrics.get('primary_reason', ''))}).")
    ood = metrics.get("out_of_distribution")
    if ood:
        per_class = ", ".join(f"{html.escape(c)} {n}" for c, n in ood["flagged_per_class"].items())
        parts.append(f"Out-of-distribution guard: {ood['flagged']} of {metrics['n_images']} scans flagged as unlike the calibration normals ({per_class}).")
    return f"<p>{' '.join(parts)}</p>" if parts else ""


def _provenance_section(metrics: dict, out: Path) -> str:
    """Method, seed, medvq version, date, the training curves and the resolved config of the run."""
    prov = metrics.get("provenance")
    if not prov:
        return ""
    facts = [("method", prov["method"]), ("seed", prov["seed"]), ("medvq version", prov["medvq_version"]), ("evaluated", prov["evaluated"])]
    table = "<table>" + "".join(f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(str(v))}</td></tr>" for k, v in facts) + "</table>"
    curves = ""
    history = prov.get("training_history") or []
    if history:
        epochs = [r["epoch"] for r in history]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for k, label in (("train_loss", "training"), ("val_loss", "validation")):
            if any(k in r for r in history):
                ax.plot(epochs, [r.get(k, np.nan) for r in history], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch", fontsize=10)
        ax.set_ylabel("loss", fontsize=10)
        ax.set_yscale("log")
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        fig.tight_layout()
        curves = f"<h3>Training curves</h3><img class='fig' src='{_figure(fig, out, 'training')}' alt='training curves'><p class='muted'>Also figures/training.svg and .png.</p>"
    import yaml

    config = f"<details><summary>Resolved config (config.yaml of the run)</summary><pre>{html.escape(yaml.safe_dump(prov['config'], sort_keys=False))}</pre></details>"
    return f"<h2>Run</h2>{table}{curves}{config}"


def _reconstruction_section(rec: dict, npz: dict) -> str:
    """Mean SSIM / PSNR / MSE (overall and per class) and input / reconstruction / error rows."""
    groups = {"all": rec, **rec.get("by_class", {})}
    cell = lambda m, k, f: "–" if m.get(k) is None else (f"{m[k]:{f}}" + (f" ± {m[f'{k}_std']:{f}}" if m.get(f"{k}_std") is not None else ""))
    rows = "".join(
        f"<tr><td class='l'>{html.escape(g)}</td><td>{m['n_images']}</td><td>{cell(m, 'ssim', '.3f')}</td><td>{cell(m, 'psnr', '.2f')}</td>"
        f"<td>{cell(m, 'mse', '.2e')}</td></tr>"
        for g, m in groups.items()
    )
    table = f"<table><tr><th class='l'>images</th><th>n</th><th>SSIM</th><th>PSNR (dB)</th><th>MSE</th></tr>{rows}</table>"
    note = (
        f"<p class='muted'>Per-image means ± standard deviations; intensities in [0, {rec['data_range']:g}] and data range {rec['data_range']:g} "
        "(SSIM with an 11-pixel Gaussian window). Per-image values are in reconstruction.csv.</p>"
    )
    if "recon_image" not in npz:
        return f"<h2>Reconstruction</h2>{table}{note}"
    images, recons = npz["recon_image"], npz["recon_reconstruction"]
    errors = np.abs(images - recons)
    vmax = max(float(np.quantile(errors, 0.995)), 1e-6)  # one colour scale for every error image
    row = lambda label, cells: f"<tr><td class='l'><b>{label}</b></td>" + "".join(f"<td><img src='{_png(c)}'></td>" for c in cells) + "</tr>"
    captions = "".join(
        f"<td>{html.escape(str(n))}<br>SSIM {s:.3f}<br>PSNR {p:.1f} dB</td>" for n, s, p in zip(npz["recon_names"], npz["recon_ssim"], npz["recon_psnr"])
    )
    gallery = (
        "<table class='gal'>"
        + row("input", [_gray(x) for x in images])
        + row("reconstruction", [_gray(x) for x in recons])
        + row(f"|error| (0–{vmax:.2f})", [colorize(e, 0.0, vmax) for e in errors])
        + f"<tr><td></td>{captions}</tr></table>"
    )
    return (
        f"<h2>Reconstruction</h2>{table}{note}<h3>From the worst to the best SSIM</h3>{gallery}"
    )


def samples_report(out_dir: str | Path) -> Path:
    """report.html of a ``medvq sample`` folder, from its samples.json, codes.npy and sample_NNN.png."""
    out = Path(out_dir)
    info = json.loads((out / "samples.json").read_text())
    codes = np.load(out / "codes.npy", allow_pickle=False)
    images = [np.asarray(Image.open(path)) for path in sorted(out.glob("sample_*.png"))]
    figures = "".join(f"<figure><img src='{_png(im)}' alt='sample {i}' width=132><figcaption class='muted'>{i:03d}</figcaption></figure>" for i, im in enumerate(images))
    counts = np.sort(np.bincount(codes.ravel(), minlength=int(info.get("codebook_size") or codes.max() + 1)))[::-1]
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.bar(np.arange(counts.size), counts / counts.sum(), width=1.0, color="#4062bb")
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("share of positions")
    settings = {k: info.get(k) for k in ("n", "temperature", "top_k", "seed", "latent_grid", "image_size", "seconds_per_image", "codes_used", "codebook_size")}
    rows = "".join(f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>medvq samples</title><style>{CSS}</style></head><body>
<h1>medvq samples</h1>
<p class='muted'>prior run <code>{html.escape(info['run'])}</code></p>
<p>Code maps drawn from the autoregressive prior one position at a time, decoded by its frozen VQ-VAE.</p>
<table>{rows}</table>
<h2>Samples</h2><div class='gal'>{figures}</div>
<h2>Code usage</h2><img src='{_fig_png(fig)}' alt='code usage'>
<p class='muted'>Generated by medvq from samples.json, codes.npy and sample_NNN.png in this folder.</p>
</body></html>"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def build_report(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if (out / "samples.json").is_file() and not (out / "metrics.json").is_file():
        return samples_report(out)
    for needed in ("metrics.json", "scores.csv", "evaluation.npz"):
        if not (out / needed).is_file():
            raise MedvqError(f"missing {needed}", path=out, fix="run `medvq evaluate` to create the evaluation folder")
    metrics = _read_saved(out / "metrics.json", lambda p: json.loads(p.read_text()))
    rows, names = _read_saved(out / "scores.csv", read_scores)
    npz = _read_saved(out / "evaluation.npz", _load_npz)
    try:
        page = _evaluation_page(metrics, rows, names, npz, out)
    except MedvqError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # a hand-edited or mismatched file
        raise MedvqError(
            f"evaluation files do not fit together ({err.__class__.__name__}: {err})", path=out, fix="run `medvq evaluate` again to rewrite them"
        ) from None
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def _pixel_note(metrics: dict) -> str:
    if "pixel_metric_images" not in metrics:
        return ""
    left_out = metrics["pixel_metric_left_out"]
    return f"\nPixel metrics over {metrics['pixel_metric_images']} images with a lesion mask (NORMAL images without one count as lesion-free)" + (
        f"; {left_out} abnormal images without a mask were left out of them." if left_out else "."
    )


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_saved(path: Path, reader):
    """Read one saved evaluation file; a truncated or edited one is named in a clear error."""
    try:
        return reader(path)
    except (ValueError, KeyError, TypeError, EOFError, IndexError, zipfile.BadZipFile) as err:
        raise MedvqError(f"damaged file ({err.__class__.__name__}: {str(err)[:200]})", path=path, fix="run `medvq evaluate` again to rewrite it") from None


def _evaluation_page(metrics: dict, rows: list, names: list, npz: dict, out: Path) -> str:
    normal = "NORMAL" if any(r["class"] == "NORMAL" for r in rows) else sorted({r["class"] for r in rows})[0]
    counts = ", ".join(f"{html.escape(c)} {n}" for c, n in metrics["counts"].items())
    classification = f"<h2>Classification</h2>{_classification_section(metrics['classification'])}" if "classification" in metrics else ""
    anomaly = (  # unlabelled data (NIfTI slices) has reconstruction metrics only
        f"""<h2>Metrics</h2>{_metrics_table(metrics)}
<p class='muted'>Best Dice uses the best threshold found on these test images, so it is an upper bound. AUPRO is normalised to 1 for a perfect map.</p>
{_operating_point_section(metrics)}
{_volume_section(metrics)}
<h2>ROC curves</h2>{_roc_section(rows, names, normal, metrics, out)}
<h2>Gallery</h2>{_gallery(npz, normal)}"""
        if metrics["maps"]
        else ""
    )
    reconstruction = _reconstruction_section(metrics["reconstruction"], npz) if "reconstruction" in metrics else ""
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>medvq evaluation</title><style>{CSS}</style></head><body>
<h1>medvq evaluation report</h1>
<p class='muted'>run <code>{html.escape(metrics['run'])}</code><br>data <code>{html.escape(metrics['data'])}</code> (split: {html.escape(metrics['split'])})</p>
<p>{metrics['n_images']} test images from {metrics['n_patients']} patients ({counts}).
{metrics['excluded_seen_in_training']} images of patients or files used in training or calibration were excluded.
Model input {metrics['image_size']}×{metrics['image_size']} px (field of view: {html.escape(metrics['fov'])}); image score = {html.escape(metrics['reducer'])} of each standardised map;
normal statistics from {metrics['calibration_images']} held-out normal images.{_pixel_note(metrics)}</p>
{_decision_summary(metrics)}
{classification}{anomaly}
{reconstruction}
{_provenance_section(metrics, out)}
<p class='muted'>Generated by medvq from metrics.json, scores.csv and evaluation.npz in this folder.</p>
</body></html>"""
    return page


