"""Codebook variants of feature-space VQ against the memory bank, on one run's patient split.

The patch features (frozen EfficientNet-Lite0, stages 2 + 3, 128 px) of a run's train / val / val_abnormal /
test scans are extracted once (cached in RUN/codebook-features.pt); each variant then scores every scan as
the mean of the top 1 % of its Gaussian-smoothed patch distances (valid pixels only) and prints image AUROC
on the validation patients (with d', the separation of abnormal from normal scores, since validation AUROC
saturates), on the test patients and per disease.

    python benchmarks/featvq_codebook.py RUN nn,coreset7678,kmeans512,kmeans2048,kmeans8192

nn: exact nearest neighbour among all training patches; coresetK: greedy k-center coreset of K patches
(PatchCore); kmeansK: a K-code k-means codebook (what featvq's codebook converges to), also with each
distance divided by / reduced by its code's mean training distance; init-SEEDING-K: featvq's own k-means
initialisation (``VectorQuantizer.initialise_by_kmeans``) with random, kmeans++ or farthest-point seeding.
"""
import json, sys, time, math
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from medvq.data.samples import Sample
from medvq.data.preprocess import Preprocessor
from medvq.models.backbones.patch_features import PatchFeatures
from medvq.models.backbones.config import PatchFeatureConfig
torch.set_num_threads(2)
run = Path(sys.argv[1]); cache = run / "codebook-features.pt"
split = json.loads((run / "split.json").read_text())["splits"]
if cache.exists():
    D = torch.load(cache)
else:
    pre = Preprocessor(image_size=128)
    net = PatchFeatures(PatchFeatureConfig()); net.load_imagenet(); net.eval()
    D = {}
    for part in ("train", "val", "val_abnormal", "test"):
        feats, valids, labels = [], [], []
        for s in split[part]:
            _, p = pre.load(Sample(path=Path(s["path"]), label=s["label"], patient_id=s["patient_id"]))
            with torch.no_grad():
                feats.append(net.embed(p.image[None].float())[0])
            valids.append(F.interpolate(p.valid[None].float(), size=feats[-1].shape[-2:], mode="area")[0, 0] > 0.5)
            labels.append(s["label"])
        D[part] = (torch.stack(feats), torch.stack(valids), labels)
    torch.save(D, cache)
print({k: v[0].shape for k, v in D.items()})
from medvq.models.patchcore.coreset import greedy_coreset
from medvq.maps.smoothing import gaussian_smooth
train = D["train"][0].permute(0, 2, 3, 1).reshape(-1, 64)
tv = D["train"][1].reshape(-1)
train = train[tv]
print("train patches", train.shape)

from medvq.models.quantizer import kmeans as quantizer_kmeans, nearest_rows as nn_dist  # the quantizer's own search and k-means


def kmeans(x, k, iters=20, seed=0):
    return quantizer_kmeans(x, k, iters, seeding="random", seed=seed)[0]

def scores(part, fn):
    f, v, labels = D[part]
    b = f.shape[0]
    q = f.permute(0, 2, 3, 1).reshape(-1, 64)
    m = fn(q).reshape(b, 1, 32, 32)
    m = gaussian_smooth(m, 0.5)[:, 0]
    out = []
    for i in range(b):
        vals = m[i][v[i]]
        k = max(1, int(round(0.01 * 16384 / 16)))
        out.append(vals.topk(min(k, vals.numel())).values.mean().item())
    return np.array(out), labels

def evaluate(name, fn):
    t0 = time.time()
    sv, lv = scores("val", fn); sa, la = scores("val_abnormal", fn)
    val_s = np.r_[sv, sa]; val_y = np.r_[np.zeros(len(sv)), np.ones(len(sa))]
    dprime = (sa.mean() - sv.mean()) / math.sqrt(0.5 * (sa.var() + sv.var()))
    st, lt = scores("test", fn); yt = np.array([l != "NORMAL" for l in lt])
    res = {"val": roc_auc_score(val_y, val_s), "val_d'": dprime, "test": roc_auc_score(yt, st)}
    for c in ("CNV", "DME", "DRUSEN"):
        sel = np.array([l in (c, "NORMAL") for l in lt])
        res[c] = roc_auc_score(yt[sel], st[sel])
    print(f"{name:28s} " + " ".join(f"{k} {v:.3f}" for k, v in res.items()) + f"  ({time.time()-t0:.0f}s)", flush=True)

variants = sys.argv[2].split(",")
for var in variants:
    if var == "nn":
        evaluate("exact NN (all patches)", lambda q: nn_dist(q, train)[0])
    elif var.startswith("coreset"):
        k = int(var[7:]); idx = greedy_coreset(train, k); bank = train[idx]
        evaluate(f"k-center coreset {k}", lambda q: nn_dist(q, bank)[0])
    elif var.startswith("kmeans"):
        k = int(var[6:]); c = kmeans(train, k)
        evaluate(f"k-means {k}", lambda q: nn_dist(q, c)[0])
        d, idx = nn_dist(train, c); n = torch.bincount(idx, minlength=k).float(); s = torch.zeros(k).index_add_(0, idx, d)
        spread = (s + d.mean()) / (n + 1)  # shrunk to the global mean for codes with few patches
        evaluate(f"k-means {k} /spread", lambda q: (lambda dd, ii: dd / spread[ii])(*nn_dist(q, c)))
        evaluate(f"k-means {k} -spread", lambda q: (lambda dd, ii: dd - spread[ii])(*nn_dist(q, c)))
    elif var.startswith("init-"):  # the quantizer's own initialisation: init-SEEDING-K (SEEDING: random, kmeans++, farthest)
        _, seeding, k = var.split("-")
        from medvq.models.quantizer import VectorQuantizer
        vq = VectorQuantizer(dim=train.shape[1], codebook_size=int(k))
        t0 = time.time(); counts = vq.initialise_by_kmeans(train, iters=20, seeding=seeding); fit_s = time.time() - t0
        c = vq.codebook.float()
        print(f"  ({seeding} seeding + 20 Lloyd iterations: {fit_s:.0f}s, {int((counts == 0).sum())} empty codes, {int((counts == 1).sum())} singletons)")
        evaluate(f"init {seeding} {k}", lambda q: nn_dist(q, c)[0])
    elif var.startswith("residual"):  # residualK: a small decoder from the code grid back to the features; ||f - decoder(codes)||^2
        k = int(var[8:]); c = kmeans(train, k)
        torch.manual_seed(0)
        decoder = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(128, 64, 3, padding=1))
        quantised = lambda f: c[nn_dist(f.permute(0, 2, 3, 1).reshape(-1, 64), c)[1]].reshape(f.shape[0], f.shape[2], f.shape[3], 64).permute(0, 3, 1, 2)
        features = D["train"][0]; codes_train = quantised(features)
        opt = torch.optim.Adam(decoder.parameters(), 1e-3)
        t0 = time.time()
        for step in range(300):
            pick = torch.randint(0, features.shape[0], (16,))
            loss = (decoder(codes_train[pick]) + codes_train[pick] - features[pick]).pow(2).sum(1).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        print(f"  (decoder: 300 steps in {time.time() - t0:.0f}s, final training residual {loss.item():.3f} against quantisation distance "
              f"{(codes_train - features).pow(2).sum(1).mean().item():.3f})")
        decoder.eval()
        def residual(q):
            f = q.reshape(-1, 32, 32, 64).permute(0, 3, 1, 2)
            with torch.no_grad():
                e = quantised(f)
                return (decoder(e) + e - f).pow(2).sum(1).reshape(-1)
        evaluate(f"feature residual {k}", residual)
