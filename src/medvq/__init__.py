"""medvq: find and outline what is abnormal in retinal OCT and MRI scans.

    from medvq import Detector
    det = Detector.load("runs/my-run")           # safetensors + config.yaml + calibration.json
    results = det.predict_files(["scan.jpeg"])   # maps on the scan's own grid, calibrated scores
"""

from medvq.version import __version__

__all__ = ["Detector", "RunConfig", "build_config", "train_run", "evaluate_run", "write_phantom"]


def __getattr__(name: str):  # imported on first use, so `import medvq` stays light
    if name == "Detector":
        from medvq.detector import Detector

        return Detector
    if name in ("RunConfig", "build_config"):
        from medvq import config

        return getattr(config, name)
    if name == "train_run":
        from medvq.engine.train import train_run

        return train_run
    if name == "evaluate_run":
        from medvq.evaluation.evaluate import evaluate_run

        return evaluate_run
    if name == "write_phantom":
        from medvq.data.phantom import write_phantom

        return write_phantom
    raise AttributeError(f"module 'medvq' has no attribute {name!r}")
