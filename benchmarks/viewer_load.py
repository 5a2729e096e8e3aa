"""Load time and size of `medvq view` pages in headless Chromium (Debian's chromium through Playwright).

    python benchmarks/viewer_load.py eval100/viewer.html eval1000/viewer.html --repeat 3

Per page: file size (and of viewer_files/ beside it), time from navigation to the page's grid being ready
(``body[data-ready]``: data parsed, every card made, thumbnails in view requested), to the visible
thumbnails being decoded, and from a click on a scan to its map overlay drawn; the median of --repeat
fresh page loads. Console errors are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

CHROMIUM = os.environ.get("MEDVQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
THUMBS_DECODED = "() => [...document.querySelectorAll('#grid .card img')].filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)"


def measure(browser, page_path: Path) -> dict:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    start = time.perf_counter()
    page.goto(page_path.resolve().as_uri(), timeout=300_000)
    page.wait_for_selector("body[data-ready='1']", timeout=300_000)
    ready = time.perf_counter() - start
    page.wait_for_function(THUMBS_DECODED, timeout=300_000)
    thumbs = time.perf_counter() - start
    start = time.perf_counter()
    page.click("#grid .card >> nth=0")
    page.wait_for_function("document.getElementById('c-map').dataset.map !== undefined", timeout=60_000)
    opened = time.perf_counter() - start
    cards = len(page.query_selector_all("#grid .card"))
    page.close()
    return {"ready_s": ready, "thumbnails_s": thumbs, "open_scan_s": opened, "cards": cards, "console_errors": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for path in args.pages:
            runs = [measure(browser, path) for _ in range(args.repeat)]
            beside = path.parent / "viewer_files"
            row = {
                "page": str(path),
                "cards": runs[0]["cards"],
                "html_mib": round(path.stat().st_size / 2**20, 2),
                "beside_mib": round(sum(f.stat().st_size for f in beside.iterdir()) / 2**20, 2) if beside.is_dir() else 0.0,
                **{k: round(statistics.median(r[k] for r in runs), 3) for k in ("ready_s", "thumbnails_s", "open_scan_s")},
                "console_errors": sum(r["console_errors"] for r in runs),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        browser.close()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
