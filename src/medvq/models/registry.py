"""The methods medvq can train, found by looking: every ``models/<name>/method.py`` declares one method.

Every method folder has the same files, and the same names in them:

    config.py        the architecture config class (pydantic, torch-free)
    model.py         build_model(model config) -> the pure nn.Module
    anomaly_map.py   compute_maps(model, images (B, C, S, S), names) -> MapOutput
    lightning.py     training_module(run config) -> LightningModule   (methods trained for epochs), or
    fit.py           fit(run config, train ScanDataset, ...) -> (model, summary)   (fitted in one pass)
    method.py        METHOD = Method(...): what the rest of medvq needs to know besides

A declaration (``Method``) names only what differs between methods: its config class, a one-line
summary, its maps and combinations, what it stands on (a prior on a VQ-VAE run) and what it can do
(export, explain, sample, extra metrics); the method is named after its folder, where the registry finds
its parts. The CLI, the engine, the Detector, evaluation and the benchmark read these declarations; none
of them names a method.

The declarations import no torch, so ``medvq --help`` lists methods and flags fast: the torch parts are
imported on first call (``Lazy``), and so are the few hooks a declaration names itself
(``ref("module:attr")`` into its own folder).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import nn


class Lazy:
    """A callable named ``"module:attr.attr"`` inside a package, imported on its first call."""

    def __init__(self, package: str, ref: str):
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"a lazy reference is 'module:attr', got {ref!r}")
        self.module, self.attr = f"{package}.{module}", attr

    @functools.cached_property
    def target(self) -> Callable:
        obj: Any = importlib.import_module(self.module)
        for part in self.attr.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.module}:{self.attr})"


def lazy_in(package: str) -> Callable[[str], Lazy]:
    """``ref = lazy_in(__package__)``; ``ref("model:VQVAE")`` names ``VQVAE`` of the method's own ``model.py``."""
    return functools.partial(Lazy, package)


@dataclass(frozen=True)
class Dependency:
    """A method built on another method's run: the model config field ``field`` names a run of ``method``
    (the benchmark trains that method first and fills the field with its run of the same seed)."""

    method: str
    field: str


@dataclass(frozen=True)
class Method:
    summary: str  # one line for help texts
    order: int  # place in listings (`medvq train --help`, the benchmark's 'all'): the established methods first
    config: type[BaseModel]  # the architecture config (``model:`` of a run config), torch-free
    map_names: tuple[str, ...]  # maps the method can compute, in report order
    normal_only: bool = True  # trains on the normal class only (unsupervised)
    # Supervised methods (normal_only=False) train on every class of the training patients and say how:
    maps_for: Callable[..., tuple[str, ...]] | None = None  # (model config) -> maps this configuration can give (default: map_names)
    resolve_config: Callable[..., Any] | None = None  # (RunConfig, training labels) -> RunConfig with data-dependent fields set
    targets: Callable[..., list[int]] | None = None  # (RunConfig, class names) -> integer training targets
    # Methods built on another run (a prior on a VQ-VAE) complete their config and take that run's patient split:
    depends_on: tuple[Dependency, ...] = ()
    prepare: Callable[..., tuple[Any, dict]] | None = None  # (RunConfig, data root, RunDir) -> (RunConfig, {'train', 'val', 'test'} -> samples)
    # The map (or model score) that decides when the validation patients hold no abnormal scans to choose on:
    # the method's best on kermany-dev and the phantom (README, Results); None: 'combined', else the first map.
    primary_map: str | None = None
    combinations: tuple[str, ...] = ()  # named combinations 'a+b' calibrated next to 'combined' (the mean of the standardised maps a and b)
    metrics: tuple[Literal["reconstruction", "classification"], ...] = ()  # metric families evaluate adds to the anomaly metrics
    streams_training: bool = False  # reads training scans from disk batch by batch (memory independent of their number) instead of holding them
    channels_last: bool = False  # convolutional end to end: NHWC memory is faster on the CPU (results agree to float rounding)
    gray_to_rgb: bool = False  # the model repeats the gray scan into its in_channels itself (else in_channels must be 1)
    # Model fields added after runs were saved, with the value a saved config.yaml without them means (every run's
    # config.yaml holds every field of its time, so a missing one marks an older run, not a wish for today's default):
    stored_model_defaults: dict[str, Any] = field(default_factory=dict)
    # Methods whose scoring path traces into one ONNX graph (`medvq export`): prepares the loaded model for
    # tracing and says whether the graph takes any batch size (else it is exported for one scan at a time).
    onnx_export: Callable[["nn.Module"], bool] | None = None
    explains: bool = False  # `medvq explain`: its maps are explanations of its own prediction (class probabilities in extras)
    # `medvq sample`: (model config) -> None if a model of this configuration draws new code maps, else (why not, the fix);
    # its model then has .sample(n, temperature=, top_k=, generator=, on_step=) -> codes, .sample_length and .decode_codes(codes)
    sampling: Callable[[BaseModel], tuple[str, str] | None] | None = None
    name: str = ""  # its folder's name, given by the registry

    @property
    def package(self) -> str:
        """The method's folder as a package, ``medvq.models.<name>``."""
        if not self.name:
            raise RuntimeError("a method's parts are found through its folder: take the method from get_method(name)")
        return f"{__package__}.{self.name}"

    def _part(self, ref: str) -> Lazy:
        """``ref`` ("file:name") in the method's folder."""
        return Lazy(self.package, ref)

    @functools.cached_property
    def training(self) -> Literal["train", "fit"]:
        """How it learns, as its folder says: "train" with lightning.py (a LightningModule trained for epochs,
        resumable), "fit" with fit.py (one pass over the training scans, no epochs)."""
        return "train" if _learning_file(self.package) == "lightning" else "fit"

    @functools.cached_property
    def build_model(self) -> Callable[..., "nn.Module"]:
        """(model config) -> the pure nn.Module."""
        return self._part("model:build_model")

    @functools.cached_property
    def compute_maps(self) -> Callable[..., Any]:
        """(model, images (B, C, S, S), names) -> MapOutput."""
        return self._part("anomaly_map:compute_maps")

    @functools.cached_property
    def training_module(self) -> Callable[..., Any] | None:
        """(RunConfig) -> LightningModule, for a method trained for epochs (else None)."""
        return self._part("lightning:training_module") if self.training == "train" else None

    @functools.cached_property
    def fit(self) -> Callable[..., tuple["nn.Module", dict]] | None:
        """(RunConfig, train ScanDataset, device=, console=, progress=) -> (model, summary), for a method fitted in one pass (else None)."""
        return self._part("fit:fit") if self.training == "fit" else None

    def maps(self, model_config) -> tuple[str, ...]:
        """The maps a model built from ``model_config`` computes by default."""
        return self.maps_for(model_config) if self.maps_for is not None else self.map_names

    @property
    def reconstructs(self) -> bool:
        return "reconstruction" in self.metrics


def _learning_file(package: str) -> Literal["lightning", "fit"]:
    """Which of lightning.py (trained for epochs) and fit.py (fitted in one pass) the method folder holds: exactly one."""
    files = [f for f in ("lightning", "fit") if importlib.util.find_spec(f"{package}.{f}") is not None]
    if len(files) != 1:
        folder = package.replace(".", "/")
        raise TypeError(f"{folder}/ needs lightning.py (trained for epochs) or fit.py (fitted in one pass), not {' and '.join(f + '.py' for f in files) or 'neither'}")
    return files[0]


@functools.cache
def _discovered() -> dict[str, Method]:
    """Every ``medvq.models.<name>.method`` module's ``METHOD``, in their declared order."""
    import medvq.models as package

    found: list[Method] = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg or importlib.util.find_spec(f"{package.__name__}.{info.name}.method") is None:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}.method")
        declared = getattr(module, "METHOD", None)
        if not isinstance(declared, Method):
            raise TypeError(f"{module.__name__} must define METHOD = Method(...)")
        if declared.name not in ("", info.name):
            raise ValueError(f"{module.__name__} declares method '{declared.name}'; a method is named after its folder")
        _learning_file(f"{package.__name__}.{info.name}")  # the folder says how the method learns
        found.append(dataclasses.replace(declared, name=info.name))
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


def get_method(name: str) -> Method:
    methods = _discovered()
    if name not in methods:
        raise KeyError(f"unknown method '{name}' (available: {', '.join(methods)})")
    return methods[name]


def method_names() -> list[str]:
    return list(_discovered())


def methods() -> list[Method]:
    return list(_discovered().values())


def model_configs() -> dict[str, type[BaseModel]]:
    """Method name -> its architecture config class (``model:`` of a run config)."""
    return {m.name: m.config for m in methods()}


def in_dependency_order(names: list[str]) -> list[str]:
    """``names`` with every method after the methods it is built on (otherwise in the given order)."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        for dep in get_method(name).depends_on:
            if dep.method in names:
                visit(dep.method)
        out.append(name)

    for name in names:
        visit(name)
    return out
