"""Feature-space VQ: codebook learning, exact maps, the code prior's NLL by hand, DDP statistics, end to end."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from typer.testing import CliRunner

from medvq.cli import app
from medvq.config import build_config
from medvq.data.samples import Sample
from medvq.detector import Detector
from medvq.models.featvq.anomaly_map import compute_maps
from medvq.maps.nll import code_nll
from medvq.models.featvq.model import CodePrior, FeatVQ, FeatVQConfig, sincos_positions
from medvq.models.featvq.lightning import FeatVQModule
from medvq.models.quantizer import CodeMeans, PatchSample, VectorQuantizer, sample_keys

runner = CliRunner()
CENTRES = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 4.0]])


def _clustered(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """(1, D, n_per * k, 1) points around each centre: a feature map the quantizer takes as it takes patch features."""
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(n_per, 0) + noise * torch.randn(n_per * len(centres), centres.shape[1], generator=g)
    return points.T[None, :, :, None].contiguous()


def _match(codebook: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Distance from each centre to its nearest code."""
    return torch.cdist(centres, codebook.float()).min(dim=1).values


# --- the codebook -------------------------------------------------------------------------------------
def test_kmeans_init_finds_the_clusters_and_ema_follows_them():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=4, kmeans_init=True, kmeans_iters=20, dead_code_threshold=0.0, ema_decay=0.8)
    vq.train()
    vq(_clustered(64, CENTRES, 0.1, seed=1))  # the first batch initialises the codebook by k-means
    assert _match(vq.codebook[0] if vq.codebook.ndim == 3 else vq.codebook, CENTRES).max() < 0.1
    moved = CENTRES + torch.tensor([0.5, -0.5, 0.5, -0.5])
    for step in range(40):  # the clusters move: EMA updates carry every code along
        vq(_clustered(64, moved, 0.1, seed=10 + step))
    codebook = vq.codebook
    assert _match(codebook, moved).max() < 0.05
    assert _match(codebook, CENTRES).min() > 0.9
    vq.eval()
    before = codebook.clone()
    out = vq(_clustered(8, CENTRES, 0.1, seed=99))
    assert torch.equal(vq.codebook, before), "no EMA step in evaluation"
    assert out.indices.unique().numel() == 4


def test_kmeans_of_a_sample_gives_a_rare_cluster_its_own_code_and_ema_continues_from_it():
    rare = torch.tensor([[-4.0, -4.0, 0, 0]])
    points = torch.cat([_clustered(200, CENTRES, 0.1, seed=2), _clustered(3, rare, 0.1, seed=3)], dim=2)  # 3 of 803 points
    vq = VectorQuantizer(dim=4, codebook_size=5, kmeans_init=True, dead_code_threshold=0.0, ema_decay=0.8)
    counts = vq.initialise_by_kmeans(points[0, :, :, 0].T, iters=20, seeding="farthest")
    assert _match(vq.codebook, torch.cat([CENTRES, rare])).max() < 0.1, "every cluster, the rare one too, has a code"
    assert sorted(counts.tolist()) == [3.0, 200.0, 200.0, 200.0, 200.0] and bool(vq.vq._codebook.initted)
    vq.train()
    vq(_clustered(64, CENTRES, 0.1, seed=4))  # initialised: the library's first-batch k-means does not run again
    assert _match(vq.codebook, rare).item() < 0.1


def test_patch_sample_is_bounded_uniform_and_independent_of_order_repeats_and_processes():
    scans, positions, capacity = 40, 16, 100
    features = torch.randn(scans, positions, 3)
    keys = lambda idx: sample_keys(torch.tensor(idx), positions)
    whole = PatchSample(capacity)
    for start in range(0, scans, 8):  # batches in order
        idx = list(range(start, start + 8))
        whole.add(features[idx].reshape(-1, 3), keys(idx))
    shuffled = PatchSample(capacity)
    order = torch.randperm(scans, generator=torch.Generator().manual_seed(0)).tolist()
    for idx in (order[:25], order[25:], order[:10]):  # another order, and some scans seen twice (an epoch padded by repeats)
        shuffled.add(features[idx].reshape(-1, 3), keys(idx))
    halves = [PatchSample(capacity), PatchSample(capacity)]  # what two processes hold; gathered() merges them the same way
    for rank in (0, 1):
        idx = list(range(rank, scans, 2))
        halves[rank].add(features[idx].reshape(-1, 3), keys(idx))
    merged = PatchSample(capacity)
    for half in halves:
        merged.add(half.vectors, half.keys)
    expected = whole.gathered()
    assert expected.shape == (capacity, 3) and len(whole) == capacity
    assert torch.equal(shuffled.gathered(), expected) and torch.equal(merged.gathered(), expected)
    assert len(torch.unique(expected, dim=0)) == capacity, "no feature twice"
    per_scan = torch.stack([(expected[:, None] == features[s][None]).all(-1).any(-1).sum() for s in range(scans)])
    assert per_scan.max() <= 8, "spread over the scans, not the first ones"


def test_code_means_move_each_code_to_the_mean_of_its_vectors_whatever_the_batching():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [9.0, 1.0], [12.0, -1.0], [11.0, 3.0]])  # 3 near code 0, 3 near code 1, none near 2
    expected = torch.tensor([[0.0, 1.0], [32 / 3, 1.0], [0.0, 10.0]])  # the members' means; code 2 keeps its place
    for batches in ([vectors], [vectors[:2], vectors[2:5], vectors[5:]], [vectors[4:], vectors[:4]]):
        means = CodeMeans(codebook)
        for batch in batches:
            means.add(batch)
        centres, counts = means.centres()
        torch.testing.assert_close(centres, expected)
        assert counts.tolist() == [3.0, 3.0, 0.0]
    twice = CodeMeans(codebook)
    twice.add(vectors)
    centres, counts = twice.centres(reduce=lambda t: 2 * t)  # what summing over two processes that saw the same vectors gives
    torch.testing.assert_close(centres, expected)
    assert counts.tolist() == [6.0, 6.0, 0.0]
    vq = VectorQuantizer(dim=2, codebook_size=3)
    vq.set_codebook(centres, counts)
    torch.testing.assert_close(vq.codebook, expected)
    assert bool(vq.vq._codebook.initted) and vq.vq._codebook.cluster_size[0].tolist() == [6.0, 6.0, 0.0]


@pytest.mark.parametrize("refit", [True, False])
def test_a_full_kmeans_sample_is_followed_by_a_refit_on_every_training_patch_once(refit):
    """A sample smaller than the scans' patches: the k-means codes then move to the means of all the training patches
    nearest them, each scan counted once though the epoch repeats one (padding to its minimum size)."""
    torch.manual_seed(0)
    config = dict(codebook_size=6, feature_stages=[2], kmeans_sample_patches=100, kmeans_iters=5, prior_layers=1, prior_dim=16, prior_heads=2)
    images = torch.rand(5, 1, 32, 32)
    loader = [{"image": images[[0, 1]], "index": torch.tensor([0, 1])}, {"image": images[[2, 3, 0]], "index": torch.tensor([2, 3, 0])},
              {"image": images[[4]], "index": torch.tensor([4])}]  # fmt: skip
    kmeans_only = FeatVQModule({**config, "codebook_refit": False})
    kmeans_only._trainer = SimpleNamespace(train_dataloader=loader, world_size=1, global_rank=0)
    kmeans_only._initialise_codebook()
    module = FeatVQModule({**config, "codebook_refit": refit})
    module.model.load_state_dict(kmeans_only.model.state_dict())  # the same backbone (untrained here: any features do)
    module._trainer = SimpleNamespace(train_dataloader=loader, world_size=1, global_rank=0)
    module._initialise_codebook()
    start = kmeans_only.model.quantizer.codebook
    if not refit:
        assert torch.equal(module.model.quantizer.codebook, start)
        return
    features = module.model.encode(images).permute(0, 2, 3, 1).reshape(-1, start.shape[1])  # each scan once: 5 x 64 patches > 100
    nearest = torch.cdist(features, start).argmin(dim=1)
    expected = torch.stack([features[nearest == k].mean(0) if (nearest == k).any() else start[k] for k in range(6)])
    torch.testing.assert_close(module.model.quantizer.codebook, expected, atol=1e-5, rtol=1e-5)
    assert module.model.quantizer.vq._codebook.cluster_size.sum() == len(features)
    assert not torch.allclose(expected, start), "the sample's codes moved"


def _planted_model(codebook: torch.Tensor) -> FeatVQ:
    model = FeatVQ(FeatVQConfig(codebook_size=codebook.shape[0], feature_stages=[2], prior_layers=1, prior_dim=16, prior_heads=2))
    cb = model.quantizer.vq._codebook
    cb.embed.data.copy_(codebook[None])
    cb.initted.data.fill_(True)
    return model.eval()


def test_distance_map_is_exact_for_a_planted_off_codebook_feature(monkeypatch):
    torch.manual_seed(0)
    codebook = torch.randn(8, 24) * 2
    model = _planted_model(codebook)
    features = codebook[torch.randint(0, 8, (2, 16, 16))].permute(0, 3, 1, 2).contiguous()  # (2, 24, 16, 16), every patch on a code
    offset = torch.zeros(24)
    offset[5] = 0.7
    offset[11] = -0.4
    features[1, :, 3, 9] = codebook[2] + offset  # nearest code is still 2, at squared distance 0.65
    monkeypatch.setattr(model, "encode", lambda images: features)
    out = model.quantize(features)
    expected = torch.zeros(2, 16, 16)
    expected[1, 3, 9] = 0.65
    torch.testing.assert_close(out.distances, expected, atol=1e-5, rtol=0)
    assert out.codes[1, 3, 9] == 2
    maps = compute_maps(model, torch.rand(2, 1, 64, 64), ["quantization_distance"]).maps["quantization_distance"]
    assert maps.shape == (2, 1, 64, 64) and maps[0].abs().max() < 1e-5
    peak = maps[1, 0].flatten().argmax()
    assert (int(peak) // 64) // 4 == 3 and (int(peak) % 64) // 4 == 9, "the map peaks on the planted patch"


# --- the code prior -------------------------------------------------------------------------------------
def _by_hand(prior: CodePrior, codes: torch.Tensor, context: str) -> torch.Tensor:
    """-log p(k_i | context) per position, computed query by query with explicit softmax attention (one layer)."""
    (layer,) = prior.layers
    h, w = codes.shape
    n, dim, heads = h * w, prior.code_embedding.embedding_dim, layer.heads
    pos = sincos_positions(h, w, dim, codes.device)[0]
    tokens = torch.cat([prior.empty_token[0], prior.code_embedding(codes.flatten()) + prior.token_position(pos)])  # (1 + N, C)
    keys, values = layer.kv(layer.norm_kv(tokens)).chunk(2, dim=-1)
    out = torch.empty(h, w)
    for i in range(n):
        visible = [0] + [1 + j for j in range(n) if (j < i if context == "causal" else j != i)]
        query = prior.query_position(pos[i])
        q = layer.q(layer.norm_q(query))
        attended = []
        for head in range(heads):
            sl = slice(head * dim // heads, (head + 1) * dim // heads)
            weights = torch.softmax(torch.stack([q[sl] @ keys[j, sl] for j in visible]) / math.sqrt(dim // heads), dim=0)
            attended.append(sum(wt * values[j, sl] for wt, j in zip(weights, visible)))
        query = query + layer.proj(torch.cat(attended))
        query = query + layer.mlp(layer.norm_mlp(query))
        logp = torch.log_softmax(prior.head(prior.norm(query)), dim=0)
        out[i // w, i % w] = -logp[codes[i // w, i % w]]
    return out


@pytest.mark.parametrize("context", ["bidirectional", "causal"])
def test_nll_map_equals_minus_log_p_of_the_true_code_given_its_context(context):
    torch.manual_seed(0)
    prior = CodePrior(codebook_size=5, dim=8, layers=1, heads=2, context=context).eval()
    for p in prior.parameters():  # move every weight off its initial value so no term vanishes
        p.data.add_(0.3 * torch.randn_like(p))
    codes = torch.randint(0, 5, (2, 3, 4))
    with torch.no_grad():
        nll = code_nll(prior(codes), codes)
        for b in range(2):
            torch.testing.assert_close(nll[b], _by_hand(prior, codes[b], context), atol=1e-5, rtol=1e-5)
        # a position's prediction never sees its own code (bidirectional) or any later one (causal)
        logits = prior(codes)
        changed = codes.clone()
        changed[0, 1, 2] = (codes[0, 1, 2] + 1) % 5
        other = prior(changed)
        torch.testing.assert_close(other[0, :, 1, 2], logits[0, :, 1, 2])
        if context == "causal":
            torch.testing.assert_close(other[0, :, :1], logits[0, :, :1])  # earlier rows unchanged
            torch.testing.assert_close(other[0, :, 1, :2], logits[0, :, 1, :2])
        else:
            assert not torch.allclose(other[0, :, 0, 0], logits[0, :, 0, 0]), "every other position sees the change"


def test_grouped_prior_reads_and_predicts_each_codes_group():
    torch.manual_seed(0)
    near = lambda centre: torch.tensor(centre) + 0.01 * torch.randn(4, 2)  # four codes around each of three points
    codebook = torch.cat([near([5.0, 0.0]), near([0.0, 5.0]), near([-5.0, -5.0])])  # (12, 2)
    model = FeatVQ(FeatVQConfig(codebook_size=12, prior_vocabulary=3, feature_stages=[2], prior_layers=1, prior_dim=8, prior_heads=2)).eval()
    model.quantizer.vq._codebook.embed.data.copy_(F.pad(codebook, (0, model.config.feature_dim - 2))[None])
    model.group_codes(iters=10)
    groups = model.code_groups
    assert [len(set(groups[i : i + 4].tolist())) for i in (0, 4, 8)] == [1, 1, 1] and len(set(groups.tolist())) == 3
    assert "code_groups" in model.state_dict(), "grouping is stored with the weights"
    codes = torch.randint(0, 12, (2, 3, 4))
    with torch.no_grad():
        expected = code_nll(model.prior(groups[codes]), groups[codes])
        torch.testing.assert_close(model.code_nll(codes), expected)
        assert model.prior_logits(codes).shape == (2, 3, 3, 4), "logits over 3 groups, not 12 codes"
    ungrouped = FeatVQ(FeatVQConfig(codebook_size=12, prior_vocabulary=0, feature_stages=[2], prior_layers=1, prior_dim=8, prior_heads=2))
    assert torch.equal(ungrouped.code_groups, torch.arange(12)) and "code_groups" not in ungrouped.state_dict()


def test_hidden_codes_are_invisible_to_every_prediction():
    torch.manual_seed(0)
    prior = CodePrior(codebook_size=6, dim=16, layers=2, heads=4, context="bidirectional").eval()
    codes = torch.randint(0, 6, (1, 4, 4))
    hidden = torch.zeros(1, 4, 4, dtype=torch.bool)
    hidden[0, 2, 1] = True
    changed = codes.clone()
    changed[0, 2, 1] = (codes[0, 2, 1] + 3) % 6
    with torch.no_grad():
        torch.testing.assert_close(prior(codes, hidden), prior(changed, hidden))
        assert not torch.allclose(prior(codes), prior(changed))


def test_predicting_chosen_positions_gives_their_rows_of_the_full_pass():
    torch.manual_seed(0)
    prior = CodePrior(codebook_size=6, dim=16, layers=2, heads=4, context="bidirectional").eval()
    codes = torch.randint(0, 6, (2, 4, 4))
    queries = torch.tensor([[5, 0, 15], [3, 3, 9]])
    with torch.no_grad():
        full = prior(codes).flatten(2)  # (B, K, 16)
        part = prior(codes, queries=queries)  # (B, K, 3)
    torch.testing.assert_close(part, full.gather(2, queries[:, None].expand(-1, 6, -1)), atol=1e-5, rtol=1e-5)


# --- DDP: codebook statistics summed over processes -------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, data: torch.Tensor, codebook: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vq = _stats_quantizer(codebook)
        assert vq.synchronise_across_processes()
        for step in range(data.shape[0]):
            vq(data[step, rank::world].permute(1, 0)[None, :, :, None].contiguous())  # this process's half of the batch
        cb = vq.vq._codebook
        kmeans = _kmeans_of_scans(data, codebook.shape[0], scans=range(rank, data.shape[0] * data.shape[1] // 16, world))
        torch.save({"cluster_size": cb.cluster_size.clone(), "embed_avg": cb.embed_avg.clone(), "embed": cb.embed.clone(), "kmeans": kmeans}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _kmeans_of_scans(data: torch.Tensor, k: int, scans) -> torch.Tensor:
    """The k-means codebook of a ``PatchSample`` of the given 'scans' (rows of 16 features of ``data``), gathered
    over every process (as the training module's initialisation does)."""
    features = data.reshape(-1, 16, data.shape[-1])
    sample = PatchSample(capacity=100)
    for i in scans:
        sample.add(features[i], sample_keys(torch.tensor([i]), 16))
    vq = VectorQuantizer(dim=data.shape[-1], codebook_size=k)
    vq.initialise_by_kmeans(sample.gathered(), iters=10, seeding="kmeans++")
    return vq.codebook.clone()


def _stats_quantizer(codebook: torch.Tensor) -> VectorQuantizer:
    vq = VectorQuantizer(dim=codebook.shape[1], codebook_size=codebook.shape[0], kmeans_init=False, dead_code_threshold=0.0, ema_decay=0.9)
    vq.vq._codebook.embed.data.copy_(codebook[None])
    vq.vq._codebook.embed_avg.data.copy_(codebook[None])
    return vq.train()


@pytest.mark.slow
def test_two_gloo_processes_give_the_codebook_statistics_and_kmeans_initialisation_of_one(tmp_path):
    torch.manual_seed(0)
    codebook = torch.randn(6, 5)
    data = torch.randn(4, 64, 5) * 1.5  # 4 steps of 64 features
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), data, codebook, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    single = _stats_quantizer(codebook)
    assert not single.synchronise_across_processes(), "one process: nothing to synchronise"
    for step in range(data.shape[0]):
        single(data[step].permute(1, 0)[None, :, :, None].contiguous())
    cb = single.vq._codebook
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["cluster_size"], cb.cluster_size, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["embed_avg"], cb.embed_avg, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["embed"], cb.embed, atol=1e-5, rtol=1e-5)
        # the k-means initialisation from each process's scans, gathered, is the one of all scans in one process
        torch.testing.assert_close(got["kmeans"], _kmeans_of_scans(data, codebook.shape[0], scans=range(data.shape[0] * data.shape[1] // 16)))
    assert not torch.allclose(cb.embed[0], codebook), "the codebook moved"


# --- configuration and end to end ----------------------------------------------------------------------
def test_config_shares_patchcore_features_and_checks_the_prior():
    c = build_config({"method": "featvq", "data": {"image_size": 128}})
    assert c.model.feature_stages == [2, 3] and c.model.feature_dim == 64 and c.model.grid_stride == 4
    with pytest.raises(Exception, match="prior_dim"):
        FeatVQ(FeatVQConfig(prior_dim=10, prior_heads=4))


@pytest.mark.slow
def test_train_evaluate_infer_on_the_phantom(tiny_phantom, tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    flags = ["--image-size", "64", "--codebook-size", "256", "--epochs", "2", "--codebook-epochs", "1", "--min-images-per-epoch", "0",
             "--val-fraction", "0.2", "--test-fraction", "0.3", "--device", "cpu", "--samples-per-epoch", "2", "--lr", "3e-3"]  # fmt: skip
    result = runner.invoke(app, ["train", "featvq", "--data", str(tiny_phantom), "--out", str(run), *flags])
    assert result.exit_code == 0, result.output
    assert (run / "model" / "best.safetensors").is_file() and (run / "latents" / "train_codes.npz").is_file()
    exported = np.load(run / "latents" / "train_codes.npz")  # written from the codes alone: the same as a full prediction's
    detector = Detector.load(run)
    scan = Path(str(exported["paths"][0]))
    _, prepared = detector.preprocessor.load(Sample(path=scan, label="NORMAL", patient_id="p"))
    assert np.array_equal(detector.predict(prepared.image[None]).codes[0].numpy(), exported["codes"][0])
    assert set(detector.codes(prepared.image[None])) == {"codes"}
    result = runner.invoke(app, ["evaluate", str(run), "--data", str(tiny_phantom), "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert {"quantization_distance", "nll", "combined", "quantization_distance+nll"} <= set(m["maps"])
    assert m["maps"]["quantization_distance"]["pixel_auroc"] > 0.85, "planted lesions light up the distance map"
    assert m["maps"]["quantization_distance"]["image_auroc"] > 0.6
    scans = sorted((tiny_phantom / "test" / "CNV").glob("*.jpeg"))[:2]
    result = runner.invoke(app, ["infer", str(run), *map(str, scans), "--out", str(tmp_path / "infer")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "infer" / "overlays").glob("*.png"))) == 2
