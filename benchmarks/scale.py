"""Training cost against the number of training scans: peak memory, time per 1,000 scans, model size, speed.

    python benchmarks/scale.py --methods featvq,patchcore,vqvae --sizes 1000,5000,26000 --work /tmp/scale \\
        --config featvq=configs/benchmark/featvq-cpu.yaml --config vqvae=configs/benchmark/vqvae-cpu.yaml

Writes (or reuses) a phantom at 128 x 128 px in WORK/phantom with at least max(--sizes) NORMAL training scans
(90 % NORMAL, patients split 97 / 2 / 1 % into train / val / test), seen through a folder of links that keeps
``--val-scans`` NORMAL validation scans (validation and calibration then cost the same at every size). For
every size and method it trains ``medvq train METHOD --max-train-images N`` in a fresh process (``--epochs``
epochs for methods trained by gradient; one fit for a memory bank), sampling the process's resident memory
(``VmHWM``, and ``ru_maxrss`` at its end; every 5 s into the JSON's ``rss_timeline``). Per run it reports:

- ``wall``: the whole training command (reading, training, validation, calibration on the validation scans
  and, for VQ models, the export of the training scans' codes);
- ``epoch`` (gradient methods: the first epoch as ``metrics.csv`` records it, validation pass included) or
  ``fit`` (a memory bank: feature pass + coreset, from ``fit.json``), and that per 1,000 training scans;
- ``peak RSS`` of the training process (it starts no reading workers: ``num_workers`` 0);
- the model file's size (``model/best.safetensors``);
- ``scans/s``: ``Detector.predict`` (model, maps, smoothing, calibrated scores) on ``--infer-scans``
  preprocessed test scans held in memory, the runs of one size taking turns for ``--repeats`` rounds (the
  best round counts), and featvq's rate over PatchCore's at that size.

A run that takes longer than ``--time-limit`` seconds is stopped and reported with the peak memory it had
reached. The 1-minute load average at the start and end of every measurement is printed next to it; a
markdown table closes the output, and ``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

PHANTOM_SIZE = 128
NORMAL_SHARE, TRAIN_SHARE = 0.9, 0.97
CLASS_FRACTIONS = {"NORMAL": NORMAL_SHARE, "CNV": 0.1 / 3, "DME": 0.1 / 3, "DRUSEN": 0.1 / 3}
SPLIT_FRACTIONS = (TRAIN_SHARE, 0.02, 0.01)


def load() -> float:
    return os.getloadavg()[0]


def phantom(root: Path, normals: int) -> Path:
    """A phantom with at least ``normals`` NORMAL training scans (a complete one with enough of them is reused)."""
    from medvq.data.config import PhantomConfig
    from medvq.data.phantom import write_phantom

    n = int(math.ceil((normals / (NORMAL_SHARE * TRAIN_SHARE) + 100) / 1000) * 1000)  # a margin for the split by patient
    meta = root / "phantom.json"
    known = json.loads(meta.read_text()) if meta.is_file() else {}
    if not (known.get("complete") and known["counts"]["train"]["NORMAL"] >= normals):  # a larger phantom serves as well
        started = time.perf_counter()
        write_phantom(
            root, n, seed=0, config=PhantomConfig(height=PHANTOM_SIZE, width=PHANTOM_SIZE), split_fractions=SPLIT_FRACTIONS,
            class_fractions=CLASS_FRACTIONS, progress=True,
        )  # fmt: skip
        print(f"phantom: {n} scans in {time.perf_counter() - started:.0f}s -> {root}", flush=True)
    have = json.loads(meta.read_text())["counts"]["train"]["NORMAL"]
    if have < normals:
        raise SystemExit(f"{root}: {have} NORMAL training scans, fewer than {normals}; remove the folder and run again")
    return root


def with_few_validation_scans(root: Path, normals: int) -> Path:
    """A view of the phantom (symlinks) with all its training and test scans but only ``normals`` NORMAL and
    about a fifth as many abnormal validation scans: calibration scores every validation scan, and with a memory
    bank that costs more the larger the bank, so a fixed small set keeps it from swamping the training."""
    view = root.with_name(f"{root.name}-val{normals}")
    if (view / "complete").is_file():
        return view
    for split in ("train", "val", "test"):
        for cls_dir in sorted((root / split).iterdir()):
            files = sorted(cls_dir.glob("*.jpeg"))
            if split == "val":
                files = files[: normals if cls_dir.name == "NORMAL" else max(1, normals // 15)]
            (view / split / cls_dir.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = view / split / cls_dir.name / f.name
                if not link.is_symlink():
                    link.symlink_to(f)
    (view / "complete").write_text("")
    return view


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM): resident set now and its peak so far of a live process, in kB; zeros once it is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def train(method: str, size: int, data: Path, out: Path, log: Path, config: Path | None, epochs: int, threads: int, time_limit: float) -> dict:
    """``medvq train`` in a fresh process: wall time, peak memory, and what the run recorded."""
    from medvq.models.registry import get_method

    fit = get_method(method).training == "fit"
    cmd = [sys.executable, "-m", "medvq.cli", "train", method, "--data", str(data), "--out", str(out), "--max-train-images", str(size), "--device", "cpu", "--overwrite"]
    if config is not None:
        cmd += ["--config", str(config)]
    if not fit:
        cmd += ["--epochs", str(epochs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result: dict = {"method": method, "scans": size, "command": " ".join(["medvq", *cmd[3:]]), "load_start": load()}
    print(f"{method} {size}: {result['command']}  (load {result['load_start']:.1f})", flush=True)
    started = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak, stopped, status, usage, timeline, last = 0, False, 0, None, [], -math.inf
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            now_kb, high_kb = memory_kb(proc.pid)
            peak = max(peak, high_kb)
            if time.perf_counter() - last >= 5:  # where in the run the memory goes: seconds, MB, lines logged so far
                last = time.perf_counter()
                timeline.append((round(last - started, 1), round(now_kb / 1024), log.read_text().count("\n")))
            if not stopped and time.perf_counter() - started > time_limit:
                os.killpg(proc.pid, signal.SIGTERM)
                stopped = True
            elif stopped and time.perf_counter() - started > time_limit + 30:  # a loop that does not check for the signal
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = max(peak, usage.ru_maxrss if usage else 0) / 1024
    result["load_end"] = load()
    result["stopped"] = stopped
    result["rss_timeline"] = timeline
    result["returncode"] = proc.returncode
    if proc.returncode and not stopped:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{method} at {size} scans failed ({proc.returncode}); {log}:\n" + "\n".join(tail))
    if stopped:
        return result
    weights = out / "model" / "best.safetensors"
    result["model_mb"] = weights.stat().st_size / 2**20
    if fit:
        summary = json.loads((out / "fit.json").read_text())
        result["train_s"] = summary["feature_seconds"] + summary["coreset_seconds"]
        result["train_stage"] = "fit"
        result["memory_bank"] = summary["memory_bank"]
        result["scans"] = summary["train_images"]
    else:
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        result["train_s"] = float(rows[0]["seconds"])
        result["train_stage"] = "epoch 1"
        # Few scans are cycled to make up an epoch of min_images_per_epoch: the time is that of those images.
        result["epoch_images"] = max(size, yaml.safe_load((out / "config.yaml").read_text())["train"]["min_images_per_epoch"])
    result["train_s_per_1000"] = result["train_s"] / result.get("epoch_images", result["scans"]) * 1000
    return result


def inference(runs: dict[str, Path], data: Path, scans: int, batch_size: int, repeats: int) -> dict[str, dict]:
    """Scans per second of ``Detector.predict`` on the same preprocessed test scans, the runs taking turns."""
    from medvq.data.dataset import ScanDataset
    from medvq.data.samples import collect_images
    from medvq.detector import Detector

    detectors = {m: Detector.load(r) for m, r in runs.items()}
    found = sorted(collect_images([data / "test"]), key=lambda s: str(s.path))
    samples = found[:: max(1, len(found) // scans)][:scans]
    held = ScanDataset(samples, next(iter(detectors.values())).preprocessor, load_masks=False)
    best = {m: math.inf for m in detectors}
    start = load()
    for det in detectors.values():  # warm-up
        det.predict(held.batch(range(min(2, len(held)))).image)
    for _ in range(repeats):
        for m, det in detectors.items():
            t0 = time.perf_counter()
            for b in held.batches(batch_size):
                det.predict(b.image, b.valid)
            best[m] = min(best[m], time.perf_counter() - t0)
    end = load()
    return {m: {"scans_per_s": len(held) / best[m], "infer_scans": len(held), "load_infer": f"{start:.1f}–{end:.1f}"} for m in detectors}


def bank_of_size(run: Path, scans: int, dest: Path) -> tuple[Path, int]:
    """A copy of a PatchCore run whose bank has as many entries as a fit on ``scans`` training scans keeps
    (its own entries repeated): the nearest-neighbour search costs the same, its scores mean nothing."""
    from safetensors.torch import load_file, save_file

    summary = json.loads((run / "fit.json").read_text())
    entries = round(summary["memory_bank"] * scans / summary["train_images"])
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "samples", "latents", "plots"), dirs_exist_ok=True)
    weights = load_file(run / "model" / "best.safetensors")
    bank = weights["memory_bank"]
    weights["memory_bank"] = bank.repeat(-(-entries // bank.shape[0]), 1)[:entries].contiguous()
    save_file(weights, dest / "model" / "best.safetensors")
    return dest, entries


def markdown(rows: list[dict]) -> str:
    head = "| method | training scans | wall | epoch / fit | per 1,000 scans | peak RSS | model file | scans/s | featvq ÷ PatchCore | load (train; inference) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rates = {(r["method"], r["size"]): r.get("scans_per_s") for r in rows if r.get("train_stage") != "bank only"}
    rate = lambda v: f"{v:.3f}" if v < 0.1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
    for r in rows:
        fmt_s = lambda s: f"{int(s // 60)}:{s % 60:04.1f}" if s >= 60 else f"{s:.1f} s"
        if r.get("train_stage") == "bank only":
            ratio = f"{r['featvq_scans_per_s'] / r['scans_per_s']:.1f}" if "featvq_scans_per_s" in r else ""
            cells = [
                "patchcore, search only", f"{r['scans']:,}", "–", "–", "–", "–", f"{r['model_mb']:.1f} MB (bank {r['memory_bank']:,})",
                rate(r["scans_per_s"]), ratio, f"–; {r['load_infer']}",
            ]  # fmt: skip
        elif r.get("stopped"):
            cells = [r["method"], f"{r['size']:,}", f"stopped at {fmt_s(r['wall_s'])}", "–", "–", f"≥ {r['peak_rss_mb'] / 1024:.2f} GiB", "–", "–", "–", f"{r['load_start']:.1f}–{r['load_end']:.1f}"]
        else:
            ratio = ""
            if r["method"] == "featvq" and rates.get(("patchcore", r["size"])) and r.get("scans_per_s"):
                ratio = f"{r['scans_per_s'] / rates[('patchcore', r['size'])]:.2f}"
            bank = f" (bank {r['memory_bank']:,})" if "memory_bank" in r else ""
            cells = [
                r["method"], f"{r['scans']:,}", fmt_s(r["wall_s"]), f"{r['train_stage']} {fmt_s(r['train_s'])}", fmt_s(r["train_s_per_1000"]),
                f"{r['peak_rss_mb'] / 1024:.2f} GiB", f"{r['model_mb']:.1f} MB{bank}", rate(r["scans_per_s"]) if "scans_per_s" in r else "–", ratio,
                f"{r['load_start']:.1f}–{r['load_end']:.1f}; {r.get('load_infer', '–')}",
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bank_speed(rows: list[dict], size: int, args: argparse.Namespace, data: Path) -> None:
    """Speed at ``size`` scans without the fit: PatchCore with a bank of that size (from its largest run) against
    the largest featvq run (whose cost does not depend on the number of training scans)."""
    fitted = {m: max((r for r in rows if r["method"] == m and not r["stopped"] and r.get("train_stage") != "bank only"), key=lambda r: r["size"], default=None) for m in ("patchcore", "featvq")}
    if fitted["patchcore"] is None:
        raise SystemExit("--bank-sizes needs a finished PatchCore run (train one with --methods patchcore first)")
    source = args.work / "runs" / f"patchcore-{fitted['patchcore']['size']}"
    tiled, entries = bank_of_size(source, size, args.work / "runs" / f"patchcore-bank-{size}")
    runs = {"patchcore": tiled} | ({"featvq": args.work / "runs" / f"featvq-{fitted['featvq']['size']}"} if fitted["featvq"] else {})
    rates = inference(runs, data, args.bank_scans, args.batch_size, 1)
    row = {"method": "patchcore", "size": size, "scans": size, "train_stage": "bank only", "memory_bank": entries, "source": str(source), "stopped": False, **rates["patchcore"]}
    row["model_mb"] = (tiled / "model" / "best.safetensors").stat().st_size / 2**20
    if "featvq" in rates:
        row["featvq_scans_per_s"] = rates["featvq"]["scans_per_s"]
    rows[:] = [r for r in rows if not (r["method"] == "patchcore" and r["size"] == size and r.get("train_stage") == "bank only")] + [row]
    print(json.dumps({"bank_only": size, "entries": entries, **{m: round(v["scans_per_s"], 2) for m, v in rates.items()}, "load": rates["patchcore"]["load_infer"]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="featvq,patchcore,vqvae")
    p.add_argument("--sizes", default="1000,5000,26000", help="Numbers of NORMAL training scans.")
    p.add_argument("--work", type=Path, default=Path("scale"), help="Folder for the phantom, the runs and their logs.")
    p.add_argument("--config", action="append", default=[], help="METHOD=FILE: a method's config file (repeatable).")
    p.add_argument("--epochs", type=int, default=1, help="Epochs of the methods trained by gradient.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads of the training processes and of the speed measurement.")
    p.add_argument("--time-limit", type=float, default=1800, help="Stop a training run after this many seconds (reported with its peak memory so far).")
    p.add_argument("--infer-scans", type=int, default=64, help="Test scans for the speed measurement (0: none).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--val-scans", type=int, default=100, help="NORMAL validation scans the runs calibrate on (0: all of the phantom's, 2 %% of its patients).")
    p.add_argument(
        "--bank-sizes", default="", help="Training-set sizes to time PatchCore's search at without fitting: its largest run's bank repeated to the size a fit on N scans keeps, against the largest featvq run."
    )
    p.add_argument("--bank-scans", type=int, default=8, help="Test scans for the --bank-sizes speed measurement (one round).")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    configs = {k: Path(v) for k, v in (c.split("=", 1) for c in args.config)}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "logs").mkdir(exist_ok=True)
    data = phantom(args.work / "phantom", max(sizes))
    if args.val_scans:
        data = with_few_validation_scans(data, args.val_scans)
    print(f"{os.cpu_count()} CPUs, {args.threads} thread(s) per process; phantom {data}", flush=True)
    # Earlier invocations' rows (other methods or sizes) stay in the JSON; a method and size measured again replaces its row.
    rows: list[dict] = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    for size in sizes:
        for method in methods:
            out = args.work / "runs" / f"{method}-{size}"
            r = train(method, size, data, out, args.work / "logs" / f"{method}-{size}.log", configs.get(method), args.epochs, args.threads, args.time_limit)
            r["size"] = size
            rows = [x for x in rows if (x["method"], x["size"]) != (method, size)] + [r]
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "rss_timeline"}), flush=True)
        # Every finished run of this size takes turns, those of earlier invocations included.
        fitted = [r for r in rows if r["size"] == size and not r["stopped"] and r.get("train_stage") != "bank only"]
        done = {r["method"]: args.work / "runs" / f"{r['method']}-{size}" for r in fitted}
        if done and args.infer_scans:
            rates = inference(done, data, args.infer_scans, args.batch_size, args.repeats)
            for r in fitted:
                r.update(rates[r["method"]])
            print(json.dumps({"scans": size, **{m: round(v["scans_per_s"], 2) for m, v in rates.items()}, "load": rates[next(iter(rates))]["load_infer"]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    for size in sorted(int(s) for s in args.bank_sizes.split(",") if s):
        bank_speed(rows, size, args, data)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(markdown(sorted(rows, key=lambda r: (r["size"], r["method"], r.get("train_stage") == "bank only"))))


if __name__ == "__main__":
    main()
