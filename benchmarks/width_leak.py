"""How well can the original scan width be read from preprocessed images?

In Kermany OCT2017 the scan width tracks the class (normals mostly 1024 px, DME/DRUSEN mostly 512-768),
so a detector that can see the width can look good without looking at the retina. This script
preprocesses the NORMAL scans of a dataset with each field-of-view mode and trains a small probe
(logistic regression on texture statistics: gradient energy per axis, high-frequency power, contrast)
to tell 1024-wide scans from 512-wide ones, with patient-grouped 5-fold cross-validation.
A probe AUROC of 0.5 means the width is invisible to such a probe; 1.0 means it is plain to see.

    python benchmarks/width_leak.py --data ../shared/data/kermany-dev --image-size 128
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medvq.data.preprocess import Preprocessor
from medvq.data.readers import read_image
from medvq.data.samples import scan_dataset


def texture_features(x: np.ndarray) -> list[float]:
    gx = np.abs(np.diff(x, axis=1)).mean()
    gy = np.abs(np.diff(x, axis=0)).mean()
    power = np.abs(np.fft.rfft2(x - x.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(x.shape[0]))[:, None]
    fx = np.fft.rfftfreq(x.shape[1])[None, :]
    total = power.sum() + 1e-12
    return [gx, gy, gx / (gy + 1e-12), np.log(power[:, fx[0] > 0.25].sum() / total + 1e-12), np.log(power[fy[:, 0] > 0.25].sum() / total + 1e-12), x.std()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--class", dest="cls", default="NORMAL")
    args = p.parse_args()
    samples = scan_dataset(args.data, classes=[args.cls])
    images = [(s, read_image(s.path)) for s in samples]
    images = [(s, a) for s, a in images if a.shape[1] in (512, 1024)]
    y = np.array([int(a.shape[1] == 1024) for _, a in images])
    groups = [s.patient_id for s, _ in images]
    print(f"{len(y)} {args.cls} scans: {y.sum()} at 1024 px, {len(y) - y.sum()} at 512 px; probe AUROC (0.5 = width invisible)")
    for fov in ("stretch", "crop"):
        pre = Preprocessor(image_size=args.image_size, fov=fov)
        features = np.array([texture_features(pre(a).image[0].numpy()) for _, a in images])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        scores = cross_val_predict(probe, features, y, groups=groups, cv=GroupKFold(5), method="predict_proba")[:, 1]
        print(f"  fov={fov:8s} probe AUROC {roc_auc_score(y, scores):.3f}")


if __name__ == "__main__":
    main()
