"""Reading speed of OCT volumes per format, in B-scans per second, through medvq's own listing and reading.

Writes one volume per format (random speckle-like B-scans of a typical size) with the writers of the
tests, then times, from a cold cache, listing its B-scans (``collect_images``) and reading every one of
them (``read_sample``), as training and inference do; JPEG B-scans of the same size are timed for
comparison. Usage:

    python benchmarks/volume_reading.py --bscans 49 --height 496 --width 512 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from volume_files import write_dicom_opt, write_heidelberg_vol, write_topcon_fda, write_zeiss_img  # noqa: E402

from medvq.data import volumes  # noqa: E402
from medvq.data.readers import read_sample  # noqa: E402
from medvq.data.samples import collect_images  # noqa: E402


def _write_all(folder: Path, n: int, h: int, w: int, seed: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    bscans = (rng.gamma(2.0, 0.15, size=(n, h, w)).clip(0, 1)).astype(np.float32)
    as_uint8 = (bscans * 255).astype(np.uint8)
    jpegs = folder / "jpeg"
    jpegs.mkdir()
    for i, b in enumerate(as_uint8):
        Image.fromarray(b).save(jpegs / f"NORMAL-1-{i}.jpeg", quality=95)
    return {
        "DICOM OPT multi-frame (8 bit)": [write_dicom_opt(folder / "volume.dcm", as_uint8)],
        "DICOM OPT multi-frame (16 bit)": [write_dicom_opt(folder / "volume16.dcm", (bscans * 65535).astype(np.uint16))],
        "Heidelberg .vol (eyepy)": [write_heidelberg_vol(folder / "volume.vol", bscans**4)],
        "Zeiss .img (oct-converter)": [write_zeiss_img(folder, as_uint8)],
        "Topcon .fda, JPEG B-scans (oct-converter)": [write_topcon_fda(folder / "volume.fda", as_uint8)],
        "JPEG B-scans (one file each)": [jpegs],
    }


def time_reading(inputs: list[Path]) -> tuple[int, float]:
    volumes._load.cache_clear()
    started = time.perf_counter()
    samples = collect_images(inputs)
    for s in samples:
        read_sample(s)
    return len(samples), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bscans", type=int, default=49)
    parser.add_argument("--height", type=int, default=496)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="Timed reads per format; the fastest is reported.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        formats = _write_all(Path(tmp), args.bscans, args.height, args.width, args.seed)
        print(f"{args.bscans} B-scans of {args.height} x {args.width} px per volume; best of {args.repeats} cold reads\n")
        print("| format | file MB | B-scans | seconds | B-scans/s |")
        print("|---|---:|---:|---:|---:|")
        for name, inputs in formats.items():
            size = sum(p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir()) for p in inputs) / 1e6
            runs = [time_reading(inputs) for _ in range(args.repeats)]
            n, seconds = min(runs, key=lambda r: r[1])
            print(f"| {name} | {size:.1f} | {n} | {seconds:.3f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
