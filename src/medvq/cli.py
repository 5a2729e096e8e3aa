"""The ``medvq`` command line. Every training flag is generated from the typed config (medvq.config)."""

from __future__ import annotations

import functools
import inspect
import sys
import time
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medvq.config import DEFAULT_METHOD, BenchmarkConfig, InferenceConfig, PhantomConfig, RunConfig, build_config, dump_config, format_validation_error, load_yaml, sections
from medvq.errors import MedvqError, TrainingInterrupted
from medvq.models.registry import methods

console = Console(stderr=True, width=120)
app = typer.Typer(
    name="medvq",
    help="Detect and outline abnormal regions in retinal OCT scans: train on normal scans, score, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from medvq import __version__

        typer.echo(f"medvq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Print the medvq version and exit.", is_eager=True, callback=_print_version),
) -> None:
    """Detect and outline abnormal regions in retinal OCT scans: train on normal scans, score, evaluate, report."""


train_app = typer.Typer(help="Train a model; writes a run directory.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


CRASH_LOG = "medvq-error.log"


def _output_folder(kwargs: dict) -> Path | None:
    """Where a command writes: its --out (or the folder it rebuilds), for the crash log."""
    for key in ("out", "folder"):
        if isinstance(kwargs.get(key), Path):
            return kwargs[key]
    return None


def _write_crash_log(folder: Path | None) -> Path:
    """The traceback of an unexpected error, in the output folder (or the temp folder when that cannot be written)."""
    import tempfile
    import traceback

    text = f"medvq {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    for candidate in ([folder] if folder is not None else []) + [Path(tempfile.gettempdir())]:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            path = candidate / CRASH_LOG
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path(CRASH_LOG)


def _one_line(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True, markup=False)


def _file_on_path(path: Path) -> Path | None:
    """The file among ``path`` and the folders above it, if one is a file."""
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def friendly_errors(fn: Callable) -> Callable:
    """Input problems (MedvqError, OSError) become one line on stderr and exit status 2; any other error one
    line asking for a report, with the traceback in OUT/medvq-error.log; Ctrl-C says what was kept (130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except MedvqError as err:
            _one_line(f"error: {err}")
            raise typer.Exit(2) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            blocked = isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename and _file_on_path(Path(err.filename))
            if blocked:  # 'File exists' / 'Not a directory' alone did not say that a file stands where a folder goes
                _one_line(f"error: {where}a file stands where a folder is needed ({blocked} is a file; choose another folder, e.g. another --out)")
            else:
                _one_line(f"error: {where}{err.strerror or err} (check the path, free space and permissions, or choose another folder)")
            raise typer.Exit(2) from None
        except TrainingInterrupted as stop:
            if stop.resumable:
                _one_line(f"interrupted after epoch {stop.epochs}; --resume continues ({stop.run})")
            else:
                _one_line(f"interrupted before the first epoch finished; run the same command again to start over ({stop.run})")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            _one_line("interrupted; files already written are kept")
            raise typer.Exit(130) from None
        except Exception as err:  # a defect in medvq, not in the input: one line, the traceback in a file
            log = _write_crash_log(_output_folder(kwargs))
            _one_line(f"error: unexpected {err.__class__.__name__}: {str(err).splitlines()[0][:200] if str(err) else ''} - please report it with {log}")
            raise typer.Exit(1) from None

    return wrapper


def command(name: str) -> Callable[[Callable], Callable]:
    """``@command("evaluate")``: a ``medvq`` command, whose input problems end in one line (``friendly_errors``)."""
    return lambda fn: app.command(name)(friendly_errors(fn))


_SPEED = InferenceConfig.model_fields  # scoring speed flags of evaluate and infer; defaults from InferenceConfig


def _speed_option(name: str, *decls: str, **kw):
    f = _SPEED[name]
    # "(default: ...)" as the train flags write it: rich help reads "[default: 32]" as a markup tag and drops it
    return typer.Option(None, *decls, help=f"{f.description} (default: {f.default})", rich_help_panel="speed options", show_default=False, **kw)


def _inference(batch_size: int | None, workers: int | None, precision: str | None) -> InferenceConfig:
    given = {"batch_size": batch_size, "workers": workers, "precision": precision}
    try:
        return InferenceConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        e = err.errors()[0]
        raise MedvqError(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}", fix="see --help") from None


def _device_option():
    """--device of the commands that run a trained model: the same default as training's (auto)."""
    default = RunConfig.model_fields["train"].default.device
    return typer.Option(default, "--device", help="auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda, cuda:1, mps.")


def _scans_argument():
    """The scans of the commands that run a trained model on given files (infer, explain): one listing rule."""
    return typer.Argument(..., help="Scans, OCT volumes (DICOM multi-frame, .vol, .img), NIfTI volumes, folders of them, or a manifest CSV.")


# --- config fields -> CLI options -------------------------------------------------------------
def _unwrap_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return annotation


def _is_list(annotation) -> bool:
    return typing.get_origin(_unwrap_optional(annotation)) in (list, tuple)


def _option_for(section: str, name: str, field) -> inspect.Parameter:
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    extra = field.json_schema_extra or {}
    flag = "--" + name.replace("_", "-")
    aliases = ["--" + a for a in extra.get("aliases", [])]
    default_text = ",".join(map(str, field.default)) if isinstance(field.default, (list, tuple)) else ("(method default)" if field.default is None and origin is list else field.default)
    help_text = f"{field.description or ''} (default: {default_text})"
    if annotation is bool:
        decls, hint = [f"{flag}/--no-{name.replace('_', '-')}"], Optional[bool]
    elif origin is typing.Literal:
        decls, hint = [flag, *aliases], Optional[str]
        help_text = f"{field.description or ''} One of: {', '.join(map(str, args))}. (default: {default_text})"
    elif origin in (list, tuple):  # comma-separated on the command line
        decls, hint = [flag, *aliases], Optional[str]
    else:
        decls, hint = [flag, *aliases], Optional[annotation]
    option = typer.Option(None, *decls, help=escape(help_text), rich_help_panel=f"{section} options", show_default=False)
    return inspect.Parameter(f"{section}__{name}", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hint)


def config_options(method: str) -> Callable[[Callable], Callable]:
    """Add one option per config field of ``method`` to a command; it receives them as ``overrides``.
    A method fitted in one pass gets no flags of gradient training (epochs, optimiser, early stopping)."""
    from medvq.models.registry import get_method

    fitted = get_method(method).training == "fit"
    return section_options(sections(method), skip=lambda extra: fitted and extra.get("gradient_only", False))


def section_options(config_sections: dict[str, type], skip: Callable[[dict], bool] = lambda extra: False) -> Callable[[Callable], Callable]:
    """Add one option per field of each config section (section name -> pydantic model) to a command; it
    receives the given ones as ``overrides`` (section -> field -> value)."""
    return functools.partial(_with_config_options, config_sections=config_sections, skip=skip)


def _with_config_options(fn: Callable, config_sections: dict[str, type], skip: Callable[[dict], bool]) -> Callable:
    params = [
        _option_for(section, name, field)
        for section, model in config_sections.items()
        for name, field in model.model_fields.items()
        # fields filled in by training (a prior's frozen architectures) are not flags
        if (field.json_schema_extra or {}).get("cli", True) and not skip(field.json_schema_extra or {})
    ]
    fields = {p.name for p in params}
    base = inspect.signature(fn)
    kept = [p for p in base.parameters.values() if p.name != "overrides"]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        overrides: dict[str, dict[str, Any]] = {}
        for key in list(kwargs):
            if key in fields:
                value = kwargs.pop(key)
                if value is None:
                    continue
                section, name = key.split("__", 1)
                if _is_list(config_sections[section].model_fields[name].annotation):
                    value = [v.strip() for v in str(value).split(",") if v.strip()]
                overrides.setdefault(section, {})[name] = value
        return fn(overrides=overrides, **kwargs)

    wrapper.__signature__ = base.replace(parameters=kept + params)
    wrapper.__annotations__ = {**{p.name: p.annotation for p in kept}, **{p.name: p.annotation for p in params}}
    del wrapper.__wrapped__  # typer must see the new signature, not fn's
    return wrapper


def resolve_config(config_path: Path | None, overrides: dict[str, dict[str, Any]], method: str = DEFAULT_METHOD) -> RunConfig:
    layers: list[dict] = [{"method": method}]
    if config_path is not None:
        layers.append(load_yaml(config_path))
    layers.append(overrides)
    return build_config(*layers, source=str(config_path) if config_path else "command-line flags")


# --- commands -----------------------------------------------------------------------------------


def _train(method: str, data: Path, out: Path | None, config: Path | None, resume: bool, overwrite: bool, overrides: dict) -> None:
    from medvq.engine.run_dir import RunDir, resumed_dir, timestamped
    from medvq.engine.train import RESUMABLE_TRAIN_FIELDS, train_run

    if resume:
        if out is None:
            raise MedvqError("--resume needs --out RUNDIR")
        stored = resumed_dir(RunDir(out)).read_config()
        locked = {f"{s}.{k}" for s, kv in overrides.items() for k in kv if not (s == "train" and k in RESUMABLE_TRAIN_FIELDS)}
        if locked or config is not None:
            raise MedvqError(
                f"cannot change {', '.join(sorted(locked)) or '--config'} when resuming",
                path=out,
                fix=f"only {', '.join(sorted(RESUMABLE_TRAIN_FIELDS))} may change; start a new run for other settings",
            )
        cfg = build_config(stored.model_dump(mode="json"), overrides, source="resumed run")
    else:
        cfg = resolve_config(config, overrides, method)
        if cfg.method != method:
            raise MedvqError(f"{config} configures method '{cfg.method}'", fix=f"use `medvq train {cfg.method}`")
    out = out or timestamped(prefix=cfg.method)
    result = train_run(cfg, data, out, resume=resume, overwrite=overwrite, console=console)
    from medvq.engine.train import is_rank_zero

    if is_rank_zero():
        if result.epochs:
            console.print(f"[green]done[/] in {result.seconds:.0f}s: {result.epochs} epochs, best validation loss {result.best_val_loss:.4g} -> {out}")
        else:  # a fit-only method (memory bank): no epochs, no validation loss
            console.print(f"[green]done[/] in {result.seconds:.0f}s (fitted in one pass) -> {out}")


def register_train_command(method: str, help_text: str, resumable: bool = True) -> None:
    def command(
        data: Path = typer.Option(..., "--data", "--manifest", help="Dataset root (CLASS/ or train|val|test/CLASS/ folders, NIfTI) or a manifest CSV (path,label,patient[,eye,visit,split,mask,frame])."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<method>-<timestamp>)."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file with data/model/train/score sections; flags override it."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished epoch."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty run directory."),
        overrides: dict | None = None,
    ) -> None:
        _train(method, data, out, config, resume, overwrite, overrides or {})

    if not resumable:  # fitted in one pass: no epochs to continue from
        signature = inspect.signature(command)
        command.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "resume"])
        run = command
        command = functools.wraps(run)(lambda **kwargs: run(resume=False, **kwargs))
    train_app.command(method, help=help_text)(friendly_errors(config_options(method)(command)))


def _register_train_commands() -> None:
    for method in methods():
        register_train_command(method.name, method.summary, resumable=method.training == "train")


_register_train_commands()


@command("evaluate")
def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run directory written by `medvq train`."),
    data: Path = typer.Option(..., "--data", "--manifest", help="Dataset root or manifest CSV (its test split is scored): labelled scan folders, or NIfTI slices/volumes (reconstruction only)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/eval-<data name>)."),
    split: str = typer.Option("test", "--split", help="'test': the held-out patients; 'val': every image of the validation patients (to compare settings; their normals calibrated the run); 'all': every image the run did not train on."),
    device: str = _device_option(),
    batch_size: Optional[int] = _speed_option("batch_size", "--batch-size", min=1),
    workers: Optional[int] = _speed_option("workers", "--workers", min=0),
    precision: Optional[str] = _speed_option("precision", "--precision"),
) -> None:
    """Score a test set: metrics.json, scores.csv and report.html (anomaly metrics for labelled scans; SSIM/PSNR/MSE for reconstruction models)."""
    from medvq.evaluation.evaluate import evaluate_run

    out = out or run / f"eval-{data.resolve().name}"
    result = evaluate_run(run, data, out, split=split, inference=_inference(batch_size, workers, precision), device=device, console=console)
    print_metrics(result)
    console.print(f"report: {out / 'report.html'}")


def _with_interval(value: float, interval: list[float] | None, unreliable: bool = False) -> str:
    text = f"{value:.3f}{'*' if unreliable else ''}"
    return text + (f"\n[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def print_metrics(result: dict) -> None:
    maps = result["maps"]
    classes = sorted({c for m in maps.values() for c in m["image_auroc_per_class"]})
    pixel = any("pixel_auroc" in m for m in maps.values())
    point = result.get("operating_point")
    table = Table(title=f"{result['n_images']} test images" + (f"; primary map {result['primary_map']}" if result.get("primary_map") else ""))
    op_cols = [f"sens. @{point}", f"spec. @{point}"] if point else []
    for col in ["map", "image AUROC", *[f"AUROC {c}" for c in classes], "AUPRC", *op_cols, *(["pixel AUROC", "AUPRO", "Dice", "pointing"] if pixel else [])]:
        table.add_column(col, justify="left" if col == "map" else "right")
    for name, m in maps.items():
        op = m.get("operating_point")
        per_class_ci = m.get("image_auroc_per_class_ci", {})
        unreliable = set(m.get("unreliable_classes", []))
        cells = [
            _with_interval(m["image_auroc"], m.get("image_auroc_ci")),
            *[_with_interval(m["image_auroc_per_class"].get(c, float("nan")), per_class_ci.get(c), c in unreliable) for c in classes],
            f"{m['image_auprc']:.3f}",
        ]
        if point:
            cells += [f"{op['sensitivity']:.3f}", f"{op['specificity']:.3f}"] if op else ["–", "–"]
        if pixel:
            cells += [_with_interval(m.get("pixel_auroc", float("nan")), m.get("pixel_auroc_ci"))]
            cells += [f"{m.get(k, float('nan')):.3f}" for k in ("aupro", "dice", "pointing_game")]
        table.add_row(name, *cells)
    if maps:
        console.print(table)
        pixel_by = next((m["pixel_auroc_ci_by"] for m in maps.values() if "pixel_auroc_ci_by" in m), None)
        pixel_note = f" (pixel AUROC: resampling {pixel_by}s)" if pixel_by and pixel_by != "patient" else ""
        console.print(f"[dim]AUROC with its 95 % bootstrap interval by patient{pixel_note}; * from fewer than 10 abnormal scans: unreliable[/]")
    volumes = result.get("volume_level")
    if volumes:
        ci = lambda m: f" [{m['auroc_ci'][0]:.2f}, {m['auroc_ci'][1]:.2f}]" if m.get("auroc_ci") else ""
        aurocs = ", ".join(f"{name} {m['auroc']:.3f}{ci(m)}" for name, m in volumes["maps"].items())
        console.print(f"volume level ({volumes['n_volumes']} volumes, {volumes['aggregation']}): AUROC [95 % interval by patient] {aurocs}", highlight=False, markup=False)
    ood = result.get("out_of_distribution")
    if ood:
        per_class = ", ".join(f"{c} {n}" for c, n in ood["flagged_per_class"].items())
        console.print(f"out-of-distribution guard: {ood['flagged']} of {result['n_images']} scans flagged ({per_class})", highlight=False)
    c = result.get("classification")
    if c:
        auroc = f", AUROC macro {c['auroc_macro']:.3f}" if "auroc_macro" in c else ""
        console.print(
            f"classification: accuracy {c['accuracy']:.3f}, balanced accuracy {c['balanced_accuracy']:.3f}, "
            f"AUROC normal vs abnormal {c['auroc_abnormal']:.3f}{auroc}"
        )
    rec = result.get("reconstruction")
    if rec:
        fmt = lambda k, f: "–" if rec.get(k) is None else f"{rec[k]:{f}}"
        console.print(f"reconstruction of {rec['n_images']} test images: SSIM {fmt('ssim', '.4f')}  PSNR {fmt('psnr', '.2f')} dB  MSE {fmt('mse', '.3g')}")


@command("infer")
def infer_cmd(
    run: Path = typer.Argument(..., help="Run directory written by `medvq train`."),
    inputs: list[Path] = _scans_argument(),
    out: Path = typer.Option(..., "--out", help="Output folder for maps, overlays, scores.csv, and per volume volumes.csv and en-face maps."),
    device: str = _device_option(),
    save_npy: bool = typer.Option(True, "--npy/--no-npy", help="Also save each map as .npy (original scan grid, standardised)."),
    save_overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write an overlay PNG per scan (without: scores, decisions and .npy maps only)."),
    decide_on: Optional[str] = typer.Option(None, "--map", help="Map or score that decides and is drawn (default: the run's primary map, chosen at training)."),
    threshold: Optional[str] = typer.Option(
        None, "--threshold", help="spec95 or spec99 (95 %/99 % specificity on the calibration normals, stored with the run) or a score value (default: the run's score.operating_point, spec95)."
    ),
    contour: bool = typer.Option(False, "--contour", help="Outline in the overlays where the map crosses the threshold."),
    batch_size: Optional[int] = _speed_option("batch_size", "--batch-size", min=1),
    workers: Optional[int] = _speed_option("workers", "--workers", min=0),
    precision: Optional[str] = _speed_option("precision", "--precision"),
) -> None:
    """Anomaly maps (overlay PNG + .npy), calibrated scores and an abnormal/normal decision per scan (scores.csv); per volume a score (top-k mean of its B-scans), decision, most abnormal B-scans and an en-face map."""
    from medvq.inference import infer

    speed = _inference(batch_size, workers, precision)
    rows = infer(
        run, inputs, out, device=device, save_npy=save_npy, save_overlays=save_overlays, decide_on=decide_on, threshold=threshold,
        contour=contour, inference=speed, console=console,
    )  # fmt: skip
    called = sum(r["abnormal"] for r in rows)
    decided = f": {called} called abnormal on '{rows[0]['decision_map']}' above {rows[0]['threshold']:.4g} ({rows[0]['operating_point']})" if rows else ""
    console.print(f"{len(rows)} scans scored{decided} -> {out / 'scores.csv'}")


@command("export")
def export_cmd(
    run: Path = typer.Argument(..., help=f"Run directory written by `medvq train` ({', '.join(m.name for m in methods() if m.onnx_export is not None)})."),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    format: str = typer.Option("onnx", "--format", help="Only onnx for now."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
) -> None:
    """The whole scoring path (preprocessed image -> calibrated maps -> image scores) as one ONNX graph;
    run it without torch: python -m medvq.onnx_runtime FILE.onnx SCAN..."""
    if format != "onnx":
        raise MedvqError(f"unknown export format '{format}'", fix="use --format onnx")
    from medvq.export import export_onnx

    meta = export_onnx(run, out, checkpoint=checkpoint)
    size = out.stat().st_size / 2**20
    console.print(f"{meta['method']} scoring graph ({len(meta['outputs'])} outputs, {size:.1f} MiB) -> {out}")


@command("view")
def view_cmd(
    folder: Path = typer.Argument(..., help="Output folder of `medvq evaluate` or `medvq infer`."),
    serve: bool = typer.Option(False, "--serve", help="Also serve the folder on 127.0.0.1 and open the page (Ctrl-C stops)."),
    port: int = typer.Option(0, "--port", help="Port for --serve (0: a free one)."),
    embed: bool = typer.Option(True, "--embed/--beside", help="Images inside viewer.html (one file), or beside it in viewer_files/."),
) -> None:
    """Interactive page FOLDER/viewer.html: every scan in a sortable grid, maps as overlays, a live threshold
    with confusion counts and the ROC point; works offline."""
    from medvq.report.viewer import build_viewer, serve as serve_folder

    page = build_viewer(folder, embed=embed, warn=lambda line: console.print(f"[yellow]warning[/]: {line}", highlight=False))
    console.print(f"viewer: {page} ({page.stat().st_size / 2**20:.1f} MiB)")
    if serve:
        serve_folder(folder, port)


@command("explain")
def explain_cmd(
    run: Path = typer.Argument(..., help="Run directory written by `medvq train classifier`."),
    inputs: list[Path] = _scans_argument(),
    out: Path = typer.Option(..., "--out", help="Output folder for maps/, overlays/ and explanations.csv."),
    map_name: Optional[str] = typer.Option(None, "--map", help="gradcam (any arch), rollout or gradient-rollout (ViT: attention rollout, plain or gradient-weighted heads) (default: gradcam)."),
    head_fusion: Optional[str] = typer.Option(None, "--rollout-head-fusion", help="Rollout: fuse heads by mean, max or min (default: the run's setting)."),
    discard_ratio: Optional[float] = typer.Option(
        None, "--rollout-discard-ratio", help="Rollout: share of the lowest attention entries dropped per layer, never the CLS entry (default: the run's)."
    ),
    layer: Optional[str] = typer.Option(None, "--gradcam-layer", help="Grad-CAM: module name, e.g. layer3, _blocks.10, blocks.4.norm1 (default: the run's)."),
    target: Optional[str] = typer.Option(None, "--explain-target", help="abnormal: log-odds of abnormal; predicted: the predicted class's logit (default: the run's)."),
    device: str = _device_option(),
    # the flags' earlier names, kept working but not shown
    old_method: Optional[str] = typer.Option(None, "--method", hidden=True),
    old_head_fusion: Optional[str] = typer.Option(None, "--head-fusion", hidden=True),
    old_discard_ratio: Optional[float] = typer.Option(None, "--discard-ratio", hidden=True),
    old_layer: Optional[str] = typer.Option(None, "--layer", hidden=True),
    old_target: Optional[str] = typer.Option(None, "--target", hidden=True),
) -> None:
    """Explanation maps of a classifier (Grad-CAM, attention rollout, gradient rollout): .npy maps, overlays, predictions.
    The settings are the classifier config's fields (as `medvq train classifier` names them)."""
    from medvq.explain import explain

    pick = lambda new, old: new if new is not None else old
    rows = explain(
        run, inputs, out, method=pick(map_name, old_method) or "gradcam", head_fusion=pick(head_fusion, old_head_fusion),
        discard_ratio=pick(discard_ratio, old_discard_ratio), layer=pick(layer, old_layer), target=pick(target, old_target), device=device, console=console,
    )  # fmt: skip
    console.print(f"{len(rows)} scans -> {out / 'explanations.csv'}")


@command("sample")
def sample_cmd(
    run: Path = typer.Argument(..., help="Run directory of `medvq train prior --kind autoregressive`."),
    n: int = typer.Option(16, "-n", "--n", min=1, help="Images to draw."),
    out: Path = typer.Option(..., "--out", help="Output folder: sample_NNN.png, grid.png, codes.npy, samples.json, report.html."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.01, help="Divides the logits before sampling (below 1: safer, less varied)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample among the k most likely codes at each step (default: all codes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random draws."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images drawn together."),
    device: str = _device_option(),
) -> None:
    """Draw new code maps from an autoregressive prior (cached keys/values) and decode them with its frozen VQ-VAE."""
    from medvq.sampling import sample_run

    result = sample_run(run, n, out, temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size, device=device, console=console)
    console.print(f"{result['n']} samples in {result['seconds']:.1f}s ({result['seconds_per_image']:.2f}s per image) -> {out}")


@command("report")
def report_cmd(folder: Path = typer.Argument(..., help="An evaluation folder (metrics.json, scores.csv, evaluation.npz) or a `medvq sample` folder.")) -> None:
    """Rebuild report.html from a finished evaluation without running any model."""
    from medvq.report.html import build_report

    console.print(f"report: {build_report(folder)}")


@command("benchmark")
def benchmark_cmd(
    data: Path = typer.Option(..., "--data", "--manifest", help="Dataset root: CLASS/ folders or train|val|test/CLASS/ folders (labelled), or a manifest CSV."),
    methods: str = typer.Option(
        ",".join(BenchmarkConfig.model_fields["methods"].default), "--methods", help=BenchmarkConfig.model_fields["methods"].description
    ),
    out: Path = typer.Option(..., "--out", help="Output folder: benchmark.md/.csv/.json/.html and runs/<method>-seed<S>/."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=16, help="Image size for every method (default: each method's own setting)."),
    seed: str = typer.Option("0", "--seed", help="Training seed; several (e.g. 0,1,2) train every method once per seed and report mean ± std."),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="Seed of the patient split shared by all methods (default: the config's, 0)."),
    config: list[str] = typer.Option([], "--config", help="METHOD=FILE.yaml: settings for one method over its defaults (repeatable)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Maximum epochs of every gradient-trained method."),
    device: Optional[str] = typer.Option(None, "--device", help="Accelerator for training and inference: auto, cpu, gpu."),
    batch_size: int = typer.Option(_SPEED["batch_size"].default, "--batch-size", min=1, help="Batch size of evaluation and of the timed inference pass."),
    reuse: bool = typer.Option(False, "--reuse", help="Keep runs in OUT that finished with the same settings instead of training them again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty output folder (runs are trained again)."),
) -> None:
    """Train and evaluate several methods on the same patients and write one table (time and peak memory included)."""
    from medvq.evaluation.benchmark import markdown_table, parse_method_configs, run_benchmark

    overrides: dict[str, dict] = {}
    if split_seed is not None:
        overrides.setdefault("data", {})["split_seed"] = split_seed
    if epochs is not None:
        overrides.setdefault("train", {})["epochs"] = epochs
    if device is not None:
        overrides.setdefault("train", {})["device"] = device
    result = run_benchmark(
        data, methods.split(","), out, seeds=seed, image_size=image_size, method_configs=parse_method_configs(config),
        overrides=overrides, batch_size=batch_size, reuse=reuse, overwrite=overwrite, console=console,
    )
    typer.echo(markdown_table(result))
    console.print(f"table: {out / 'benchmark.md'}  page: {out / 'benchmark.html'}")


@command("phantom")
@section_options({"phantom": PhantomConfig})
def phantom_cmd(
    out: Path = typer.Option(..., "--out", help="Dataset root to write (OCT2017 layout + masks/)."),
    n: int = typer.Option(400, "-n", "--n", min=1, help="Number of scans."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random draws (the same seed writes the same bytes)."),
    overrides: dict | None = None,
) -> None:
    """Write a synthetic OCT dataset with pixel-exact lesion masks (NORMAL, CNV, DME, DRUSEN)."""
    from medvq.data.phantom import write_phantom

    started = time.perf_counter()
    try:
        config = PhantomConfig(**(overrides or {}).get("phantom", {}))
    except ValidationError as err:
        raise MedvqError(format_validation_error(err, "phantom flags")) from None
    try:
        root = write_phantom(out, n, seed=seed, config=config, progress=sys.stderr.isatty())
    except (ValueError, FileExistsError) as err:
        if isinstance(err, FileExistsError) and err.filename:  # the operating system's (a file where a folder goes), not the writer's own
            raise
        raise MedvqError(str(err), path=out) from None
    console.print(f"{n} phantom scans in {time.perf_counter() - started:.1f}s -> {root}")


@command("config")
def config_cmd(
    method: str = typer.Option(DEFAULT_METHOD, "--method", help="Method whose defaults to show."),
    config: Optional[Path] = typer.Option(None, "--config", help="Show this file resolved over the defaults."),
) -> None:
    """Print the full configuration with defaults, as YAML (a starting point for --config)."""
    cfg = resolve_config(config, {}, method)
    typer.echo(dump_config(cfg), nl=False)


@command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the phantom data, the run, metrics.json and report.html."),
    n: int = typer.Option(None, "-n", "--n", help="Phantom scans to generate (default from the demo preset)."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default from the demo preset)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """No data needed: make phantom OCT scans, train a VQ-VAE on the normals, evaluate, write a report."""
    from medvq.demo import run_demo

    result = run_demo(out, n=n, epochs=epochs, seed=seed, console=console)
    print_metrics(result)
    console.print(f"[bold green]report:[/] {out / 'report.html'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
