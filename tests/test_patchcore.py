"""PatchCore: greedy coreset, streaming chunks, nearest-neighbour maps, re-weighted scores, memory-bank files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medvq.cli import app
from medvq.config import build_config
from medvq.engine.run_dir import RunDir
from medvq.errors import CheckpointError, MedvqError
from medvq.models.patchcore.anomaly_map import SCORE_NAME, compute_maps
from medvq.models.patchcore.coreset import StreamingCoreset, coreset_size, greedy_coreset, projection_matrix
from medvq.models.patchcore.model import PatchCore, PatchCoreConfig


def radius(points: torch.Tensor, centres: torch.Tensor) -> float:
    """Largest distance from any point to its nearest centre (what k-center minimises)."""
    return float(torch.cdist(points, centres).min(dim=1).values.max())


def coverage_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return radius(points, points[chosen])


# --- greedy k-center ------------------------------------------------------------------------------
def test_greedy_picks_points_in_farthest_first_order():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [9.5]])
    # from 0: farthest is 10; then the point farthest from {0, 10} is 2 (distance 2) ...
    assert greedy_coreset(x, 3, start=0).tolist() == [0, 3, 2]
    assert greedy_coreset(x, 5, start=0).tolist()[:3] == [0, 3, 2]
    assert sorted(greedy_coreset(x, 5, start=1).tolist()) == [0, 1, 2, 3, 4], "every point once, none twice"


def test_greedy_takes_one_point_from_each_cluster_before_a_second():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(40, 2, generator=g) for c in centres])  # 5 tight clusters of 40
    chosen = greedy_coreset(points, 5, start=7)
    assert sorted((chosen // 40).tolist()) == [0, 1, 2, 3, 4]
    assert coverage_radius(points, chosen) < 0.5


def outlier_clusters(seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """600 points of one broad cloud and 12 tight clusters of 3 points far from it: (points, cluster id; -1 = cloud)."""
    g = torch.Generator().manual_seed(seed)
    cloud = torch.randn(600, dim, generator=g)
    offsets = torch.nn.functional.normalize(torch.randn(12, dim, generator=g), dim=1) * 60.0
    small = (offsets[:, None, :] + 0.1 * torch.randn(12, 3, dim, generator=g)).reshape(36, dim)
    points = torch.cat([cloud, small])
    ids = torch.cat([torch.full((600,), -1), torch.arange(12).repeat_interleave(3)])
    order = torch.randperm(636, generator=g)
    return points[order], ids[order]


def test_random_projection_keeps_the_choice_close():
    points, ids = outlier_clusters(seed=1, dim=256)
    exact = greedy_coreset(points, 40, start=0)
    projected = greedy_coreset(points @ projection_matrix(256, 32, seed=0), 40, start=0)
    assert set(ids[projected].tolist()) == set(range(-1, 12)), "every far cluster is kept"
    assert coverage_radius(points, projected) <= 1.15 * coverage_radius(points, exact)
    random = torch.randperm(636, generator=torch.Generator().manual_seed(0))[:40]
    assert coverage_radius(points, random) > 2 * coverage_radius(points, projected), "a random 40 misses far clusters"
    assert projection_matrix(256, 512) is None and projection_matrix(256, 0) is None


def test_greedy_rejects_impossible_requests():
    with pytest.raises(ValueError, match="cannot choose 5 of 3"):
        greedy_coreset(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError, match="start index"):
        greedy_coreset(torch.zeros(3, 2), 2, start=3)


def test_streaming_coreset_reduces_each_chunk_and_is_deterministic():
    data, ids = outlier_clusters(seed=2, dim=16)
    runs = []
    for _ in range(2):
        s = StreamingCoreset(16, ratio=0.1, chunk_patches=250, projection_dim=8, seed=5)
        for start in range(0, 636, 70):  # batches that do not line up with the chunks
            s.add(data[start : start + 70])
        runs.append(s.finish())
        assert s.chunks == 3 and s.patches_seen == 636
    bank = runs[0]
    assert torch.equal(runs[0], runs[1])
    assert bank.shape == (2 * coreset_size(250, 0.1) + coreset_size(136, 0.1), 16) == (64, 16)
    index = torch.cdist(bank, data).argmin(1)
    assert torch.equal(data[index], bank), "the bank holds training patches, not averages"
    assert set(ids[index].tolist()) == set(range(-1, 12)), "chunks still keep every far cluster"
    whole = greedy_coreset(data @ projection_matrix(16, 8, seed=5), 64, start=0)
    assert radius(data, bank) <= 1.3 * coverage_radius(data, whole)


def test_streaming_coreset_keeps_everything_at_ratio_one():
    data = torch.randn(300, 4)
    s = StreamingCoreset(4, ratio=1.0, chunk_patches=256)
    s.add(data)
    assert torch.equal(s.finish(), data)


# --- the model ---------------------------------------------------------------------------------------
def _layered(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Images of horizontal bands (a stand-in for retinal layers) with mild noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(size, dtype=torch.float32)
    out = []
    for _ in range(n):
        phase = float(torch.rand((), generator=g)) * 6.28
        band = 0.5 + 0.3 * torch.sin(rows / 3.0 + phase)
        out.append((band[:, None].expand(size, size) + 0.03 * torch.randn(size, size, generator=g)).clamp(0, 1))
    return torch.stack(out)[:, None]


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    model = PatchCore(PatchCoreConfig(feature_stages=[2, 3], coreset_ratio=0.5, reweight_neighbours=3))
    model.features.load_imagenet()
    feats = model.embed(_layered(12))
    s = StreamingCoreset(model.config.feature_dim, 0.5, 1024, 32, seed=0)
    s.add(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    model.set_memory_bank(s.finish())
    return model


def test_backbone_matches_the_classifier_efficientnet():
    from medvq.models.classifier.model import Classifier, ClassifierConfig
    from medvq.models.classifier.pretrained import load_pretrained

    pc = PatchCore(PatchCoreConfig(feature_stages=[3, 5], normalisation="half"))
    pc.features.load_imagenet()
    clf = Classifier(ClassifierConfig(arch="efficientnet-lite0"))  # half normalisation, same file
    load_pretrained(clf)
    clf.eval()
    x = torch.rand(2, 1, 64, 64)
    net = clf.net
    y = net._stem_act(net._bn0(net._conv_stem(x)))
    outs = []
    for i, block in enumerate(net._blocks[:11]):
        y = block(y)
        if i in (4, 10):  # last blocks of stages 3 and 5
            outs.append(y)
    for a, b in zip(pc.features(x), outs):
        torch.testing.assert_close(a, b)
    assert pc.embed(x).shape == (2, 40 + 112, 8, 8)


def test_nearest_equals_brute_force_in_chunks():
    model = PatchCore(PatchCoreConfig(feature_stages=[2]), distance_block_elements=7 * 50)  # blocks of 7 queries x 50 bank entries
    bank = torch.randn(50, 24)
    model.set_memory_bank(bank)
    queries = torch.randn(30, 24)
    d, i = model.nearest(queries, k=3)
    ref = torch.cdist(queries, bank)
    ref_d, ref_i = ref.topk(3, largest=False)
    torch.testing.assert_close(d, ref_d, atol=1e-4, rtol=1e-4)
    assert torch.equal(i, ref_i)


def test_planted_patch_lights_up_the_map_and_the_score(fitted):
    normal = _layered(3, seed=9)
    planted = normal.clone()
    planted[:, :, 36:48, 12:24] = 1.0  # a bright block where the bands should be
    out_n = compute_maps(fitted, normal)
    out_p = compute_maps(fitted, planted)
    m_n, m_p = out_n.maps["patch_distance"][:, 0], out_p.maps["patch_distance"][:, 0]
    assert m_p.shape == (3, 64, 64)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[36:48, 12:24] = True
    for k in range(3):
        peak = np.unravel_index(int(m_p[k].argmax()), (64, 64))
        assert 30 <= peak[0] < 54 and 6 <= peak[1] < 30, f"peak {peak} outside the planted block"
        assert m_p[k][inside].mean() > 2 * m_n[k][inside].mean()
    assert (out_p.scores[SCORE_NAME] > out_n.scores[SCORE_NAME].max()).all()


def test_reweighting_scales_the_largest_distance(fitted):
    images = _layered(2, seed=4)
    images[1, :, 20:30, 20:30] = 0.0
    plain = PatchCore(fitted.config.model_copy(update={"reweight_neighbours": 1}))
    plain.load_state_dict(fitted.state_dict())
    out, out_plain = fitted(images), plain(images)
    max_d = out.distances.flatten(1).max(1).values
    torch.testing.assert_close(out_plain.score, max_d)
    assert ((out.score > 0) & (out.score <= max_d)).all(), "weights lie in (0, 1]"
    # by hand for the first image: softmax over distances to the nearest entry m* and its neighbours
    feats = fitted.embed(images[:1])[0].flatten(1).T  # (P, D)
    p = int(out.distances[0].flatten().argmax())
    m_star = int(out.nearest[0].flatten()[p])
    support = torch.cdist(fitted.memory_bank[m_star][None], fitted.memory_bank)[0].topk(3, largest=False).indices
    d = torch.linalg.vector_norm(feats[p] - fitted.memory_bank[support], dim=1)
    torch.testing.assert_close(out.score[0], (1 - torch.softmax(d, 0)[0]) * max_d[0], atol=1e-4, rtol=1e-4)


def test_reweighting_on_a_hand_made_bank():
    """m* = 0 with two neighbours at 0.5 that the test patch (distance 2 from m*) sees at sqrt(4.25):
    w = 1 - e^2 / (e^2 + 2 e^sqrt(4.25)); a bank entry far from everything else leaves w near 1."""
    model = PatchCore(PatchCoreConfig(feature_stages=[1], reweight_neighbours=3))  # 16-dim features
    u = torch.eye(16)
    model.set_memory_bank(torch.stack([0 * u[0], 0.5 * u[1], 0.5 * u[2], 30 * u[3]]))
    patches = torch.stack([0.1 * u[1], 2.0 * u[4]])[None]  # (1, P=2, 16): the second patch is the anomalous one
    d, i = model.nearest(patches[0])
    score = model.image_scores(patches, d[:, 0][None], i[:, 0][None])
    w = 1 - np.exp(2.0) / (np.exp(2.0) + 2 * np.exp(np.sqrt(4.25)))
    assert score.item() == pytest.approx(w * 2.0, rel=1e-5) and 0.6 < w < 0.7
    lonely = torch.stack([0.1 * u[1], 31 * u[3]])[None]  # largest distance next to the isolated entry (30 u3)
    d, i = model.nearest(lonely[0])
    assert model.image_scores(lonely, d[:, 0][None], i[:, 0][None]).item() == pytest.approx(1.0, rel=1e-5)


def test_backbone_stays_frozen_in_eval_mode(fitted):
    fitted.train()
    assert not fitted.training and not any(m.training for m in fitted.modules())
    assert not any(p.requires_grad for p in fitted.parameters())


# --- the memory bank on disk --------------------------------------------------------------------------
def test_memory_bank_round_trips_through_safetensors(fitted, tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.save_weights(fitted, "best")
    stored = load_file(str(run.weights("best")))
    assert torch.equal(stored["memory_bank"], fitted.memory_bank)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a memory bank")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = PatchCore(fitted.config)
    assert fresh.memory_bank.shape[0] == 0
    run.load_weights(fresh)
    assert torch.equal(fresh.memory_bank, fitted.memory_bank)
    images = _layered(2, seed=11)
    torch.testing.assert_close(fresh(images).score, fitted(images).score)


def test_memory_bank_of_other_features_is_refused(fitted, tmp_path):
    run = RunDir(tmp_path)
    run.save_weights(fitted, "best")
    other = PatchCore(PatchCoreConfig(feature_stages=[3, 5]))
    with pytest.raises(CheckpointError, match="different configuration"):
        run.load_weights(other)


def test_empty_bank_and_wrong_input_are_explained():
    model = PatchCore(PatchCoreConfig())
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of the model stride 8"):
        model.embed(torch.rand(1, 1, 68, 68))
    with pytest.raises(ValueError, match="memory bank must be"):
        model.set_memory_bank(torch.zeros(3, 5))


def test_bad_backbone_file_names_the_file(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError, match="resnet.pth.*_conv_stem"):
        PatchCore(PatchCoreConfig()).features.load_imagenet(str(path))


# --- configuration ---------------------------------------------------------------------------------------
def test_config_checks_stages_and_sets_the_stride():
    c = build_config({"method": "patchcore", "data": {"image_size": 128}, "model": {"feature_stages": [5, 3]}})
    assert c.model.feature_stages == [3, 5] and c.model.stride == 16 and c.model.grid_stride == 8 and c.model.feature_dim == 152
    with pytest.raises(MedvqError, match="feature_stages must lie in 1..7"):
        build_config({"method": "patchcore", "model": {"feature_stages": [0, 3]}})
    with pytest.raises(MedvqError, match="multiple of the model stride 32"):
        build_config({"method": "patchcore", "data": {"image_size": 112}, "model": {"feature_stages": [6]}})


def test_train_help_lists_patchcore_flags():
    result = CliRunner().invoke(app, ["train", "patchcore", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in ("--coreset-ratio", "--feature-stages", "--patch-size", "--coreset-projection-dim", "--coreset-chunk-patches", "--reweight-neighbours"):
        assert flag in result.output, flag


def test_argmin_rows_matches_torch_first_of_equal_minima():
    import torch

    from medvq.models.patchcore.model import argmin_rows

    d = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 0.0, 5.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    assert argmin_rows(d).tolist() == d.argmin(dim=1, keepdim=True).tolist() == [[1], [3], [0]]
    wide = torch.randn(50, 700, generator=torch.Generator().manual_seed(0))
    assert torch.equal(argmin_rows(wide), wide.argmin(dim=1, keepdim=True))
