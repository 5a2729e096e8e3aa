"""``medvq benchmark``: several methods on one dataset, one patient split, one table.

Every method is trained with ``train_run`` on the same training patients (the NORMAL scans of them for
unsupervised methods; every labelled scan of them for supervised ones, marked as such) and evaluated with
``evaluate_run`` on the same test patients; the benchmark checks that every run scored exactly the same
test images. Per method and seed it measures, in this process:

- training: wall time of ``train_run`` (reading the scans, fitting or training, calibration);
- inference: images per second of ``Detector.predict_dataset`` on the preprocessed test images (model,
  maps, smoothing, calibrated scores; reading files excluded);
- peak resident memory (RSS) of each stage: on Linux the kernel's high-water mark is reset at the start
  of a stage (``/proc/self/clear_refs``), so the peak is the stage's own; elsewhere it is the peak of the
  whole process so far (marked); on a GPU also ``torch.cuda.max_memory_allocated``;
- the 1-minute load average before and after each stage, so that timings taken next to other jobs can
  be recognised.

A latent prior (``prior``) stands on the VQ-VAE run of the same seed: ``vqvae`` must be among the methods
(it is trained first) unless the prior's config names a ``vqvae_run``; the prior's training time is its own,
the VQ-VAE's is in the vqvae row.

Several seeds (``--seed 0,1,2``) train every method once per seed on the same split and report
mean ± standard deviation. Outputs in OUT: benchmark.md, benchmark.csv, benchmark.json, benchmark.html,
and runs/<method>-seed<S>/ (a full run directory, its evaluation in eval/).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console

from medvq.config import build_config, load_yaml
from medvq.data.dataset import ScanDataset
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.engine.train import torch_device, train_run
from medvq.errors import MedvqError
from medvq.evaluation.evaluate import evaluate_run, select_test_samples
from medvq.io import atomic_write_text
from medvq.models.registry import get_method, in_dependency_order, method_names
from medvq.report.benchmark import IMAGE_COLUMNS, PIXEL_COLUMNS, benchmark_page, csv_table, describe, markdown_table



# --- measuring a stage ------------------------------------------------------------------------------
def _status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class StageMeter:
    """Wall time, peak RSS and load average of one stage: ``with StageMeter() as m: ...; m.result``."""

    result: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> "StageMeter":
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._load = os.getloadavg()[0]
        self._rss = _rss_mb()
        self._own_peak = _reset_peak_rss()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._t0
        peak = _peak_rss_mb()
        self.result = {
            "seconds": seconds,
            "peak_rss_mb": peak,
            "rss_before_mb": self._rss,
            "peak_increase_mb": peak - self._rss,
            "peak_is_this_stage": self._own_peak,
            "load_1min_before": self._load,
            "load_1min_after": os.getloadavg()[0],
        }
        if self._cuda:
            self.result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20


# --- running every method ------------------------------------------------------------------------------
def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'vqvae,patchcore' or 'all' -> method names, checked against the registry."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if names == ["all"]:
        return method_names()
    unknown = [m for m in names if m not in method_names()]
    if unknown or not names:
        raise MedvqError(f"unknown method(s) {', '.join(unknown) or '(none given)'}", fix=f"choose from {', '.join(method_names())}, or 'all'")
    if len(set(names)) != len(names):
        raise MedvqError(f"a method is listed twice in {','.join(names)}")
    return names


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    try:
        seeds = [int(s) for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    except ValueError:
        raise MedvqError(f"--seed must be integers separated by commas, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise MedvqError(f"--seed needs distinct integers, got '{text}'")
    return seeds


def parse_method_configs(items: Sequence[str]) -> dict[str, Path]:
    """['vqvae=fast.yaml', ...] -> {method: path}."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MedvqError(f"--config expects METHOD=FILE.yaml, got '{item}'")
        out[name.strip()] = Path(path.strip())
    return out


def _test_fingerprint(samples) -> tuple[int, str]:
    names = sorted(f"{s.path.resolve()}:{s.frame}" for s in samples)
    return len(names), hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _run_one(method: str, config, data: Path, run_dir: Path, batch_size: int, console: Console) -> dict[str, Any]:
    with StageMeter() as train_m:
        train_run(config, data, run_dir, overwrite=True, progress=False, console=console)
    with StageMeter() as eval_m:
        metrics = evaluate_run(run_dir, data, run_dir / "eval", batch_size=batch_size, progress=False, console=console)
    run = RunDir(run_dir)
    chosen = select_test_samples(run, data)
    detector = Detector.load(run_dir, device=torch_device(config))
    test_set = ScanDataset(chosen.samples, detector.preprocessor, load_masks=False)
    detector.predict_dataset(test_set.subset(range(min(len(test_set), batch_size))), batch_size)  # warm-up (lazy inits, caches)
    with StageMeter() as infer_m:
        detector.predict_dataset(test_set, batch_size)
    infer = {**infer_m.result, "images": len(test_set), "batch_size": batch_size, "device": str(detector.device)}
    infer["images_per_second"] = len(test_set) / infer["seconds"]
    n_test, fingerprint = _test_fingerprint(chosen.samples)
    record = {
        "method": method,
        "seed": config.train.seed,
        "supervised": not get_method(method).normal_only,
        "run": str(run_dir),
        "requested_config": config.model_dump(mode="json"),  # as the benchmark built it; RUN/config.yaml adds what training resolved
        "image_size": config.data.image_size,
        "train": train_m.result,
        "evaluate": eval_m.result,
        "inference": infer,
        "test_images": n_test,
        "test_fingerprint": fingerprint,
        "counts": metrics["counts"],
        "n_patients": metrics["n_patients"],
        "has_masks": metrics["has_masks"],
        "train_images": len(run.read_split()["splits"].get("train", [])),
        "maps": metrics["maps"],
    }
    if run.fit_summary.is_file():
        record["fit"] = json.loads(run.fit_summary.read_text())
    if "classification" in metrics:
        record["classification"] = {k: metrics["classification"][k] for k in ("accuracy", "balanced_accuracy", "auroc_abnormal") if k in metrics["classification"]}
    atomic_write_text(run_dir / "benchmark_run.json", json.dumps(record, indent=1))
    return record


def check_same_test_set(records: list[dict]) -> None:
    """Every run must have scored exactly the same test images (same files, same patients)."""
    fingerprints = {(r["test_images"], r["test_fingerprint"]) for r in records}
    if len(fingerprints) != 1:
        detail = ", ".join(f"{r['method']} seed {r['seed']}: {r['test_images']} images" for r in records)
        raise MedvqError(
            f"the methods were evaluated on different test images ({detail})",
            fix="give every method the same data settings (image folder, split fractions, split seed)",
        )


@dataclass
class BenchmarkPlan:
    """What a benchmark trains: the methods in training order (a base run before the run built on it), the
    seeds, and the config of every (method, seed)."""

    methods: list[str]
    seeds: list[int]
    configs: dict[tuple[str, int], Any]

    def runs(self) -> list[tuple[str, int]]:
        return [(method, seed) for seed in self.seeds for method in self.methods]


def plan_benchmark(
    methods: Sequence[str],
    out: Path,
    *,
    seeds: Sequence[int] = (0,),
    image_size: int | None = None,
    method_configs: dict[str, Path] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> BenchmarkPlan:
    """Every run's config: the method's defaults, its --config file, ``overrides``, then the seed and image size."""
    methods = parse_methods(methods)
    seeds = parse_seeds(seeds)
    method_configs = dict(method_configs or {})
    stray = sorted(set(method_configs) - set(methods))
    if stray:
        raise MedvqError(f"--config given for {', '.join(stray)}, which is not among --methods {','.join(methods)}")
    configs = {}
    for method in methods:
        for seed in seeds:
            layers: list[dict] = [{"method": method}]
            if method in method_configs:
                layer = load_yaml(method_configs[method])
                if layer.get("method", method) != method:
                    raise MedvqError(f"configures method '{layer['method']}', not '{method}'", path=method_configs[method])
                layers.append(layer)
            layers.append(overrides or {})
            layers.append({"train": {"seed": seed}, **({"data": {"image_size": image_size}} if image_size else {})})
            source = str(method_configs.get(method, f"benchmark settings of {method}"))
            configs[method, seed] = build_config(*layers, source=source)
            for dep in get_method(method).depends_on:  # built on another method's run (a prior on a VQ-VAE): the one of the same seed
                if getattr(configs[method, seed].model, dep.field) is not None:
                    continue
                if dep.method not in methods:
                    raise MedvqError(
                        f"{method} is trained on a {dep.method} run",
                        fix=f"add {dep.method} to --methods (trained first, {method} uses it), or set model.{dep.field} with --config {method}=FILE.yaml",
                    )
                layers.append({"model": {dep.field: str((out / "runs" / f"{dep.method}-seed{seed}").resolve())}})
                configs[method, seed] = build_config(*layers, source=source)
    methods = in_dependency_order(methods)  # a method's base run is trained before it
    return BenchmarkPlan(methods=methods, seeds=seeds, configs=configs)


def _reusable(run_dir: Path, config) -> dict[str, Any] | None:
    """The record of a finished run of the same config (``--reuse``), else None."""
    done = run_dir / "benchmark_run.json"
    if not done.is_file():
        return None
    previous = json.loads(done.read_text())
    return previous if previous.get("requested_config") == config.model_dump(mode="json") else None


def summarise(data: Path, plan: BenchmarkPlan, records: list[dict], started: datetime) -> dict[str, Any]:
    """benchmark.json's content: the setting, the environment, one row per (method, score) and every run."""
    check_same_test_set(records)
    return {
        "data": str(data.resolve()),
        "methods": plan.methods,
        "seeds": plan.seeds,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
        "test_images": records[0]["test_images"],
        "test_counts": records[0]["counts"],
        "test_patients": records[0]["n_patients"],
        "rows": aggregate(records),
        "runs": records,
    }


def run_benchmark(
    data: str | Path,
    methods: Sequence[str],
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    image_size: int | None = None,
    method_configs: dict[str, Path] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 32,
    reuse: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train and evaluate every method (once per seed) on one split; write the table. Returns benchmark.json's content.

    ``method_configs``: method -> YAML file applied over that method's defaults; ``overrides``: nested
    sections applied to every method on top (e.g. {'train': {'epochs': 5}}); ``image_size`` and each seed
    come last. ``reuse`` keeps a finished run whose config is unchanged instead of training it again.
    """
    console = console or Console(stderr=True)
    data, out = Path(data), Path(out)
    plan = plan_benchmark(methods, out, seeds=seeds, image_size=image_size, method_configs=method_configs, overrides=overrides)
    if out.exists() and any(out.iterdir()) and not (overwrite or reuse):
        raise MedvqError("output folder is not empty", path=out, fix="use --reuse to keep finished runs, --overwrite to replace them, or another --out")

    started = datetime.now()
    records = []
    for method, seed in plan.runs():
        config = plan.configs[method, seed]
        run_dir = out / "runs" / f"{method}-seed{seed}"
        previous = _reusable(run_dir, config) if reuse else None
        if previous is not None:
            console.print(f"[bold]benchmark[/] reusing {method} seed {seed} from {run_dir}")
            records.append(previous)
            continue
        console.print(f"[bold]benchmark[/] {method} (seed {seed}) on {data}")
        records.append(_run_one(method, config, data, run_dir, batch_size, console))
    result = summarise(data, plan, records, started)
    write_outputs(result, out)
    return result


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


# --- the table --------------------------------------------------------------------------------------
def _values(records: list[dict], get) -> list[float]:
    out = []
    for r in records:
        try:
            v = get(r)
        except (KeyError, TypeError):
            continue
        if v is not None and np.isfinite(v):
            out.append(float(v))
    return out


def _stat(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(records: list[dict]) -> list[dict[str, Any]]:
    """One row per (method, score): every metric as {mean, std, n} over the seeds."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        for score in runs[0]["maps"]:
            m = lambda r: r["maps"][score]
            row: dict[str, Any] = {
                "method": method,
                "score": score,
                "supervised": runs[0]["supervised"],
                "image_size": runs[0]["image_size"],
                "seeds": [r["seed"] for r in runs],
                "train_images": runs[0]["train_images"],
            }
            for _, key in IMAGE_COLUMNS + PIXEL_COLUMNS:
                row[key] = _stat(_values(runs, lambda r: m(r)[key]))
            classes = sorted({c for r in runs for c in m(r).get("image_auroc_per_class", {})})
            row["image_auroc_per_class"] = {c: _stat(_values(runs, lambda r: m(r)["image_auroc_per_class"][c])) for c in classes}
            widths = sorted({w for r in runs for w in m(r).get("image_auroc_by_width", {})}, key=lambda w: (not w.isdigit(), int(w) if w.isdigit() else 0, w))
            row["image_auroc_by_width"] = {w: _stat(_values(runs, lambda r: m(r)["image_auroc_by_width"][w])) for w in widths}
            row["train_seconds"] = _stat(_values(runs, lambda r: r["train"]["seconds"]))
            row["inference_images_per_second"] = _stat(_values(runs, lambda r: r["inference"]["images_per_second"]))
            row["train_peak_mb"] = _stat(_values(runs, lambda r: r["train"]["peak_rss_mb"]))
            row["inference_peak_mb"] = _stat(_values(runs, lambda r: r["inference"]["peak_rss_mb"]))
            rows.append(row)
    return rows


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "benchmark.json", json.dumps(result, indent=1))
    atomic_write_text(out / "benchmark.csv", csv_table(result))
    atomic_write_text(out / "benchmark.md", f"{markdown_table(result)}\n\n{describe(result)}\n")
    atomic_write_text(out / "benchmark.html", benchmark_page(result, out))
