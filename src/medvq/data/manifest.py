"""Manifest files: a CSV (or TSV) that lists the scans and says what each one is.

Columns (header row required, any order, names case-insensitive):

- ``path`` (required): an image file or a volume file, absolute or relative to the manifest's folder;
- ``label`` (required): the class (e.g. NORMAL, CNV); empty on every row for unlabelled data;
- ``patient`` (required): the patient id, never guessed from the file name;
- ``eye`` (optional): OD / OS (also R / L, right / left);
- ``visit`` (optional): a visit id or date;
- ``split`` (optional): train, val or test, on every row or on none (then the split is made by patient);
- ``mask`` (optional): a lesion mask image of the same size as the scan;
- ``frame`` (optional): one B-scan / slice of a volume file (0-based); empty = every B-scan of it.

Every problem is found before anything is read (a missing column, a file that does not exist, a bad eye
or split, the same scan listed twice, one file under two patients, a patient in two splits) and all of
them are reported at once, each with its line number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from medvq.errors import DatasetError

MANIFEST_SUFFIXES = (".csv", ".tsv")
REQUIRED_COLUMNS = ("path", "label", "patient")
OPTIONAL_COLUMNS = ("eye", "visit", "split", "mask", "frame")
EYES = {"od": "OD", "r": "OD", "re": "OD", "right": "OD", "os": "OS", "l": "OS", "le": "OS", "left": "OS"}
SPLIT_NAMES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
MAX_LISTED = 20  # problems listed in the error; the rest are counted


@dataclass(frozen=True)
class ManifestRow:
    line: int  # line number in the file (the header is line 1)
    path: Path
    label: str
    patient: str
    eye: str = ""
    visit: str = ""
    split: str | None = None
    mask: Path | None = None
    frame: int | None = None


def is_manifest(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """The rows of a manifest, checked; raises one DatasetError listing every problem with its line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("manifest not found", path=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read the manifest: {err}", path=path, fix="save it as UTF-8 text") from None
    reader = csv.reader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    lines = list(reader)
    if not lines or not any(cell.strip() for cell in lines[0]):
        raise DatasetError("empty manifest", path=path, fix=f"the first line names the columns: {', '.join(REQUIRED_COLUMNS)}[, {', '.join(OPTIONAL_COLUMNS)}]")
    header = [c.strip().lower() for c in lines[0]]
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing:
        problems.append(f"line 1: missing column(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"line 1: unknown column(s) {', '.join(unknown)} (known: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    if problems:
        _raise(path, problems)
    rows = []
    for number, cells in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            problems.append(f"line {number}: {len(cells)} fields for {len(header)} columns")
            continue
        row = _parse_row(number, dict(zip(header, (c.strip() for c in cells))), path.parent, problems)
        if row is not None:
            rows.append(row)
    if not rows and not problems:
        problems.append("no rows after the header")
    problems += _consistency(rows)
    if problems:
        _raise(path, problems)
    return rows


def _parse_row(line: int, cell: dict[str, str], base: Path, problems: list[str]) -> ManifestRow | None:
    before = len(problems)
    file = _resolve(cell["path"], base)
    if not cell["path"]:
        problems.append(f"line {line}: empty path")
    elif not file.is_file():
        problems.append(f"line {line}: {cell['path']} does not exist" if not file.exists() else f"line {line}: {cell['path']} is not a file")
    if not cell["patient"]:
        problems.append(f"line {line}: empty patient")
    eye = cell.get("eye", "")
    if eye and eye.lower() not in EYES:
        problems.append(f"line {line}: eye '{eye}' is not OD or OS (or R / L, right / left)")
    split = cell.get("split", "")
    if split and split.lower() not in SPLIT_NAMES:
        problems.append(f"line {line}: split '{split}' is not train, val or test")
    mask = _resolve(cell["mask"], base) if cell.get("mask") else None
    if mask is not None and not mask.is_file():
        problems.append(f"line {line}: mask {cell['mask']} does not exist")
    frame = cell.get("frame", "")
    if frame and not (frame.isdigit()):
        problems.append(f"line {line}: frame '{frame}' is not a B-scan index (0, 1, 2, ...)")
    if len(problems) > before:
        return None
    return ManifestRow(
        line=line,
        path=file,
        label=cell["label"],
        patient=cell["patient"],
        eye=EYES.get(eye.lower(), ""),
        visit=cell.get("visit", ""),
        split=SPLIT_NAMES[split.lower()] if split else None,
        mask=mask,
        frame=int(frame) if frame else None,
    )


def _consistency(rows: list[ManifestRow]) -> list[str]:
    """Problems between rows: duplicates, one file under two patients or eyes, a patient in two splits."""
    problems: list[str] = []
    labelled = [r for r in rows if r.label]
    if labelled and len(labelled) != len(rows):
        first = next(r for r in rows if not r.label)
        problems.append(f"line {first.line}: empty label while other rows have one (label every row, or none for unlabelled data)")
    with_split = [r for r in rows if r.split]
    if with_split and len(with_split) != len(rows):
        first = next(r for r in rows if not r.split)
        problems.append(f"line {first.line}: empty split while other rows have one (give every row a split, or none to split by patient)")
    scans: dict[tuple[Path, int | None], ManifestRow] = {}
    files: dict[Path, ManifestRow] = {}
    patient_split: dict[str, ManifestRow] = {}
    for r in rows:
        key = (r.path.resolve(), r.frame)
        if key in scans:
            problems.append(f"line {r.line}: the same scan as line {scans[key].line}" + (f" with another label ({scans[key].label} / {r.label})" if scans[key].label != r.label else ""))
        scans.setdefault(key, r)
        first = files.setdefault(key[0], r)
        if first is not r:
            if first.patient != r.patient:
                problems.append(f"line {r.line}: {r.path.name} is patient {r.patient} here but {first.patient} on line {first.line} (a file holds one patient's scans)")
            if first.eye != r.eye:
                problems.append(f"line {r.line}: {r.path.name} is eye {r.eye or '(none)'} here but {first.eye or '(none)'} on line {first.line}")
            if (first.frame is None) != (r.frame is None):
                problems.append(f"line {r.line}: {r.path.name} is listed whole on line {(first if first.frame is None else r).line} and by frame on the other (one or the other)")
        if r.split:
            other = patient_split.setdefault(r.patient, r)
            if other.split != r.split:
                problems.append(f"line {r.line}: patient {r.patient} is in split {r.split} here but {other.split} on line {other.line} (a patient belongs to one split)")
    return problems


def _resolve(text: str, base: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _raise(path: Path, problems: list[str]) -> None:
    shown = problems[:MAX_LISTED]
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DatasetError(
        f"{len(problems)} problem(s) in the manifest: " + "; ".join(shown) + more,
        path=path,
        fix=f"columns {', '.join(REQUIRED_COLUMNS)} and optionally {', '.join(OPTIONAL_COLUMNS)}; paths relative to the manifest's folder",
    )
