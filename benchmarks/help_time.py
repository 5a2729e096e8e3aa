"""Wall time of ``python -m medvq.cli --help`` (the CLI's start-up: imports and command set-up), for one or
more source trees in turn, so that their ratio comes from one run on one machine state.

    python benchmarks/help_time.py [--runs 5] SRC [SRC ...]   # e.g. /path/to/old-checkout/src src

Each round runs every tree once; a first round warms the file cache and is not counted. Prints the median
and every time per tree, with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="+", help="src/ folders holding the medvq package")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {src: [] for src in args.src}
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    for round_ in range(args.runs + 1):
        for src in args.src:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "medvq.cli", "--help"], env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.DEVNULL, check=True)
            if round_:
                times[src].append(time.perf_counter() - start)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for src, values in times.items():
        print(f"{src}: median {statistics.median(values):.3f} s ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
