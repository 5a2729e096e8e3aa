"""The interactive viewer: one offline HTML page over the output of `medvq evaluate` or `medvq infer`.

    medvq view runs/pc/eval            # writes runs/pc/eval/viewer.html
    medvq view runs/pc/eval --serve    # and opens it from a local port

A pure function of saved outputs (scores.csv, metrics.json, maps.npz of an evaluation; maps/*.npy,
volumes.json of an inference) and of the scans they name: no model runs. Every scored scan becomes a card
in a grid (sortable by any score, filterable by class and decision); a click opens the scan at full
resolution with each calibrated map as an overlay (opacity, colour bar in calibrated units: standard
deviations of normal pixels), the reconstruction and the lesion-mask outline where they exist, its scores,
percentiles and decision. A threshold slider on any score (starting at the stored threshold) recounts true
and false positives and negatives, sensitivity and specificity and moves the point on the ROC curve.
Scans of a volume get a B-scan slider and the volume's en-face map.

Images are embedded (``embed=True``, the default: one file to send), each scan's images in their own block
that is decoded only when the scan is opened, thumbnails only when they scroll into view; or, for very
large sets, the full-resolution scans and thumbnails sit beside the page in ``viewer_files/``
(``embed=False``) while the small map images stay inline.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from medvq.data.readers import read_sample
from medvq.data.samples import Sample
from medvq.errors import MedvqError
from medvq.io import atomic_write_bytes, atomic_write_text, mark_output

THUMB_WIDTH = 160
MAP_LEVELS = 255  # maps travel as 8-bit images over [0, map_max] calibrated units; 0 = at or below the normal mean
OUTLINE_RGBA = (0, 255, 255, 255)
COLORMAP = "inferno"


@dataclass
class ScanAssets:
    """The images of one scan, encoded: name -> (mime type, bytes)."""

    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


@dataclass
class ViewerData:
    kind: str  # 'evaluate' or 'infer'
    records: list[dict[str, Any]]  # one per scan, in scores.csv order
    settings: dict[str, Any]  # everything the page needs besides the scans


def _encode(image: Image.Image, fmt: str, **kwargs) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return ("image/jpeg" if fmt == "JPEG" else "image/png"), buffer.getvalue()


def _gray8(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")


def _map8(m: np.ndarray, top: float) -> Image.Image:
    """Calibrated map -> 8-bit image: 0 at or below 0 (the normal mean), 255 at ``top``."""
    q = np.clip(np.nan_to_num(m.astype(np.float32), nan=0.0) / top, 0, 1) * MAP_LEVELS
    return Image.fromarray((q + 0.5).astype(np.uint8), mode="L")


def _outline(mask: np.ndarray, box_size: tuple[int, int]) -> Image.Image:
    """Lesion mask on the model grid -> its outline over the crop box (w, h), transparent elsewhere."""
    big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(box_size, Image.NEAREST)) > 127
    edge = big & ~ndimage.binary_erosion(big, iterations=2)
    rgba = np.zeros((*edge.shape, 4), np.uint8)
    rgba[edge] = OUTLINE_RGBA
    return Image.fromarray(rgba, mode="RGBA")


def _colormap() -> list[list[int]]:
    from matplotlib import colormaps

    return (colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int).tolist()


def _read_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _float(text: str | None) -> float | None:
    try:
        v = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _scan_sample(row: dict[str, str]) -> Sample:
    frame = row.get("frame", "")
    return Sample(path=Path(row["path"]), frame=int(frame) if frame not in ("", None) else None)


def locate(path: Path, data_root: Path | None, results: Path | None = None) -> Path:
    """A scan path as scores.csv holds it (relative to where the command ran, perhaps): as given, or the
    shortest tail of it that exists under the evaluation's data root, or (``results``: the folder of
    scores.csv) the path under that folder or one above it, where an inference usually ran."""
    if path.exists() or path.is_absolute():
        return path
    if data_root is not None:
        for k in range(len(path.parts)):
            candidate = data_root.joinpath(*path.parts[k:])
            if candidate.exists():
                return candidate
    if results is not None:
        for base in (results.resolve(), *results.resolve().parents):
            if (base / path).exists():
                return base / path
    return path


def _read_scan(row: dict[str, str], folder: Path, data_root: Path | None) -> np.ndarray | None:
    """The scan a row of scores.csv names, or None when its file is gone (moved or deleted since scoring)."""
    found = _scan_sample(row)
    sample = Sample(path=locate(found.path, data_root, folder), frame=found.frame)
    return read_sample(sample) if sample.path.exists() else None


def _missing_scans(missing: list[str], total: int, folder: Path) -> str:
    """Refuse a page without a single scan; otherwise the warning line for the scans shown blank."""
    if len(missing) == total:
        raise MedvqError(f"scan {missing[0]} named in scores.csv is missing", path=folder / "scores.csv", fix="run `medvq view` where the scored scans are")
    return f"{len(missing)} of {total} scans named in scores.csv are missing (first: {missing[0]}); their scores and maps are shown on a blank scan"


def _score_columns(fields: list[str]) -> list[str]:
    fixed = {"path", "name", "frame", "class", "patient", "width", "height", "decision_map", "operating_point", "threshold", "abnormal", "in_distribution", "ood_distance"}
    return [f for f in fields if f not in fixed and not f.endswith("_z") and not f.endswith("_normal_percentile")]


def collect(folder: str | Path) -> ViewerData:
    """Read what `medvq evaluate` or `medvq infer` wrote in ``folder``."""
    folder = Path(folder)
    scores_csv = folder / "scores.csv"
    if not scores_csv.is_file():
        raise MedvqError("no scores.csv here", path=folder, fix="view the output folder of `medvq evaluate` or `medvq infer`")
    rows, fields = _read_rows(scores_csv)
    if not rows:
        raise MedvqError("scores.csv lists no scans", path=scores_csv, fix="score some scans first")
    kind = "evaluate" if (folder / "metrics.json").is_file() else "infer"
    names = _score_columns(fields)
    settings: dict[str, Any] = {"kind": kind, "folder": str(folder.resolve()), "scores": names, "colormap": _colormap(), "colormap_name": COLORMAP}
    metrics = json.loads((folder / "metrics.json").read_text()) if kind == "evaluate" else {}
    normal = "NORMAL"
    thresholds: dict[str, dict[str, Any]] = {}
    if kind == "evaluate":
        normal = _normal_class(metrics)
        for name, m in metrics.get("maps", {}).items():
            if "operating_point" in m:
                op = m["operating_point"]
                thresholds[name] = {"value": op["threshold"], "name": op.get("name", metrics.get("operating_point", ""))}
        settings["decision_map"] = metrics.get("primary_map") or names[0]
        settings["run"] = metrics.get("run")
        settings["data_root"] = Path(metrics["data"]) if metrics.get("data") else None
    else:
        first = rows[0]
        if first.get("decision_map"):
            settings["decision_map"] = first["decision_map"]
            thresholds[first["decision_map"]] = {"value": float(first["threshold"]), "name": first.get("operating_point", "")}
        else:
            settings["decision_map"] = names[0]
    percentiles = _percentiles(metrics, rows, names) if kind == "evaluate" else {}
    settings.update(normal_class=normal, thresholds=thresholds, labelled=any(r.get("class") for r in rows))

    records = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {
            "i": i,
            "name": row.get("name") or Path(row["path"]).name + (f" [{row['frame']}]" if row.get("frame") else ""),
            "path": row["path"],
            "frame": int(row["frame"]) if row.get("frame") not in (None, "") else None,
            "cls": row.get("class", ""),
            "patient": row.get("patient", ""),
            "scores": {n: _float(row.get(n)) for n in names},
        }
        if row.get("in_distribution") not in (None, ""):  # the out-of-distribution guard's verdict
            rec["in_distribution"] = row["in_distribution"] == "1"
        if kind == "infer":
            rec["z"] = {n: _float(row.get(f"{n}_z")) for n in names}
            rec["pct"] = {n: _float(row.get(f"{n}_normal_percentile")) for n in names}
            if row.get("abnormal") not in (None, ""):
                rec["stored_abnormal"] = row["abnormal"] == "1"
        elif percentiles:
            rec["z"] = {n: percentiles[n][0][i] for n in percentiles}
            rec["pct"] = {n: percentiles[n][1][i] for n in percentiles}
        records.append(rec)
    settings["volumes"] = _volumes(folder, records)
    return ViewerData(kind, records, settings)


def _normal_class(metrics: dict) -> str:
    counts = metrics.get("counts", {})
    return "NORMAL" if "NORMAL" in counts or not counts else next(iter(counts))


def _percentiles(metrics: dict, rows: list[dict], names: list[str]) -> dict[str, tuple[list, list]]:
    """z and normal percentile of an evaluation's scores, from the run's calibration where it is still there."""
    run = metrics.get("run")
    path = Path(run) / "calibration.json" if run else None
    if path is None or not path.is_file():
        return {}
    from medvq.scoring.calibration import NormalCalibration

    calibration = NormalCalibration.load(path)
    known = [n for n in names if n in calibration.stats]
    table = calibration.score_table({n: np.array([_float(r.get(n)) or 0.0 for r in rows]) for n in known})
    return {n: ([round(float(x), 4) for x in t["z"]], [round(float(x), 2) for x in t["normal_percentile"]]) for n, t in table.items()}


def _volumes(folder: Path, records: list[dict]) -> list[dict]:
    """Scans of one volume file (rows with frames): their order, and the en-face map where infer wrote one."""
    groups: dict[str, list[int]] = {}
    for rec in records:
        if rec["frame"] is not None:
            groups.setdefault(rec["path"], []).append(rec["i"])
    if not groups:
        return []
    described = {}
    vfile = folder / "volumes.json"
    if vfile.is_file():
        payload = json.loads(vfile.read_text())
        described = {v["path"]: v for v in payload.get("volumes", [])}
    out = []
    for path, idx in groups.items():
        idx = sorted(idx, key=lambda i: records[i]["frame"])
        entry: dict[str, Any] = {"path": path, "scans": idx}
        v = described.get(path)
        if v is not None:
            entry.update(score=v.get("score"), decision=v.get("decision", ""), z=v.get("z"))
        for i in idx:
            records[i]["volume"] = len(out)
        out.append(entry)
    return out


def _enface(folder: Path, path: str) -> Path | None:
    stem = Path(path).name.split(".")[0]
    found = sorted((folder / "volumes").glob(f"{stem}*_enface.png")) if (folder / "volumes").is_dir() else []
    return found[0] if found else None


def scan_assets(folder: Path, data: ViewerData, maps_npz: dict[str, np.ndarray] | None, map_tops: dict[str, float]) -> list[ScanAssets]:
    """Encode every scan's images: thumbnail, full-resolution scan, maps, reconstruction, mask outline."""
    rows, _ = _read_rows(folder / "scores.csv")
    out = []
    for i, row in enumerate(rows):
        a = ScanAssets()
        rec = data.records[i]
        image = _read_scan(row, folder, data.settings.get("data_root"))
        if image is None:  # a blank scan of the size the maps were drawn for: scores and maps stay viewable
            rec["missing"] = True
            shape = (int(maps_npz["box"][i][1]), int(maps_npz["box"][i][3])) if maps_npz is not None else _infer_map_shape(folder, rec, map_tops)
            image = np.zeros(shape, np.float32)
        h, w = image.shape
        gray = _gray8(image)
        a.files["image"] = _encode(gray, "JPEG", quality=90)
        a.files["thumb"] = _encode(gray.resize((THUMB_WIDTH, max(1, round(h * THUMB_WIDTH / w))), Image.BILINEAR), "JPEG", quality=75)
        rec["width"], rec["height"] = w, h
        if maps_npz is not None:  # evaluate: maps on the model grid, placed in the crop box
            top, bottom, left, right = (int(v) for v in maps_npz["box"][i])
            rec["box"] = [top, bottom, left, right]
            for name in map_tops:
                a.files[f"map:{name}"] = _encode(_map8(maps_npz[f"map_{name}"][i].astype(np.float32), map_tops[name]), "PNG")
            if "reconstruction" in maps_npz:
                a.files["reconstruction"] = _encode(_gray8(maps_npz["reconstruction"][i].astype(np.float32)), "PNG")
            if "mask" in maps_npz and maps_npz["mask"][i].any():
                a.files["mask"] = _encode(_outline(maps_npz["mask"][i], (right - left, bottom - top)), "PNG")
        else:  # infer: maps saved on the scan's own grid
            rec["box"] = [0, h, 0, w]
            for name in map_tops:
                m = np.load(_infer_map_path(folder, rec, name))
                small = np.asarray(Image.fromarray(m.astype(np.float32)).resize((min(w, 512), max(1, round(h * min(w, 512) / w))), Image.BILINEAR))
                a.files[f"map:{name}"] = _encode(_map8(small, map_tops[name]), "PNG")
        rec["assets"] = sorted(k for k in a.files if k != "thumb")
        out.append(a)
    return out


def _infer_map_path(folder: Path, rec: dict, name: str) -> Path:
    return folder / "maps" / f"{rec['name']}_{name}.npy"


def _infer_map_shape(folder: Path, rec: dict, map_tops: dict[str, float]) -> tuple[int, int]:
    """The scan grid an inference's maps were saved on (a missing scan's size); 128 x 128 without maps."""
    for name in map_tops:
        return tuple(np.load(_infer_map_path(folder, rec, name), mmap_mode="r").shape)  # type: ignore[return-value]
    return (128, 128)


def _map_tops(folder: Path, data: ViewerData, maps_npz: dict[str, np.ndarray] | None) -> dict[str, float]:
    """Top of each map's colour scale in calibrated units: the 99.5th percentile of valid pixels, at least 3."""
    tops = {}
    if maps_npz is not None:
        valid = maps_npz["valid"]
        for key in maps_npz:
            if key.startswith("map_"):
                values = maps_npz[key][valid].astype(np.float32)
                tops[key[4:]] = max(3.0, float(np.quantile(values, 0.995))) if values.size else 3.0
        return tops
    for name in data.settings["scores"]:
        paths = [_infer_map_path(folder, r, name) for r in data.records]
        if paths and all(p.is_file() for p in paths):
            sample = np.concatenate([np.load(p).ravel()[::97] for p in paths[:200]])
            tops[name] = max(3.0, float(np.quantile(sample, 0.995)))
    return tops


def _data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode("ascii")


def _script_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def build_viewer(folder: str | Path, *, embed: bool = True, warn: Callable[[str], None] = print) -> Path:
    """Write FOLDER/viewer.html (and FOLDER/viewer_files/ when not embedding); return the page's path.
    ``warn`` receives a line about scans whose files are gone (shown blank); none at all is an error."""
    try:
        return _build_viewer(Path(folder), embed, warn)
    except MedvqError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError, zipfile.BadZipFile) as err:  # truncated or hand-edited outputs
        raise MedvqError(
            f"damaged or mismatched files ({err.__class__.__name__}: {str(err)[:200]})", path=folder, fix="run `medvq evaluate` or `medvq infer` again to rewrite them"
        ) from None


def _build_viewer(folder: Path, embed: bool, warn: Callable[[str], None]) -> Path:
    data = collect(folder)
    maps_npz = None
    if data.kind == "evaluate":
        npz_path = folder / "maps.npz"
        if npz_path.is_file():
            with np.load(npz_path) as z:
                maps_npz = {k: z[k] for k in z.files}
            if len(maps_npz["box"]) != len(data.records):
                raise MedvqError(f"maps.npz holds {len(maps_npz['box'])} scans, scores.csv {len(data.records)}", path=npz_path, fix="evaluate again")
    tops = _map_tops(folder, data, maps_npz)
    data.settings["maps"] = list(tops)
    data.settings["map_tops"] = tops
    assets = scan_assets(folder, data, maps_npz, tops)
    missing = [r["path"] for r in data.records if r.get("missing")]
    if missing:
        warn(_missing_scans(missing, len(data.records), folder))
    blocks = []
    files_dir = folder / "viewer_files"
    if not embed:
        mark_output(files_dir)  # copies of the scans and thumbnails: never read back as input scans
    for rec, a in zip(data.records, assets):
        inline = {k: _data_uri(*v) for k, v in a.files.items()}
        if not embed:  # the scan and its thumbnail beside the page; maps stay inline, since the page reads their pixels
            for key in ("image", "thumb"):  # (a page opened from file:// may draw, but not read, images from files)
                mime, payload = a.files[key]
                name = f"{rec['i']}_{key}.jpg"
                atomic_write_bytes(files_dir / name, payload)
                inline[key] = f"viewer_files/{name}"
        rec["thumb"] = inline.pop("thumb")
        blocks.append(f'<script type="application/json" id="scan-{rec["i"]}">' + _script_json(inline) + "</script>")
    for v in data.settings["volumes"]:
        found = _enface(folder, v["path"])
        if found is not None:
            v["enface"] = _data_uri("image/png", found.read_bytes()) if embed else str(found.relative_to(folder))
    template = resources.files("medvq.report").joinpath("viewer.html").read_text()
    settings = {k: v for k, v in data.settings.items() if k != "data_root"}
    page = template.replace("/*SETTINGS*/null", _script_json(settings)).replace("/*RECORDS*/null", _script_json(data.records))
    page = page.replace("<!--SCAN-BLOCKS-->", "\n".join(blocks))
    out = folder / "viewer.html"
    atomic_write_text(out, page)
    return out


def serve(folder: str | Path, port: int = 0, open_browser: bool = True) -> None:
    """Serve FOLDER on 127.0.0.1 (a free port by default) and open viewer.html until Ctrl-C."""
    import functools
    import http.server
    import webbrowser

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/viewer.html"
        print(f"serving {url} (Ctrl-C stops)", flush=True)
        if open_browser:
            webbrowser.open(url)
        server.serve_forever()
