"""Attention rollout on hand-made attention matrices, where the right answer is known."""

import pytest
import torch

from medvq.maps.rollout import attention_rollout, discard_lowest, fuse_heads, patch_grid, rollout_map


def identity(b: int, heads: int, n: int) -> torch.Tensor:
    return torch.eye(n).expand(b, heads, n, n).clone()


def cls_looks_at(patch: int, b: int = 1, heads: int = 2, n: int = 17) -> torch.Tensor:
    """Every token attends to itself, except CLS, which attends only to token 1 + patch."""
    a = identity(b, heads, n)
    a[:, :, 0, :] = 0
    a[:, :, 0, 1 + patch] = 1
    return a


def test_identity_attention_gives_a_uniform_map():
    attentions = [identity(2, 3, 17) for _ in range(4)]
    m = rollout_map(attentions)
    assert m.shape == (2, 1, 4, 4)
    assert torch.allclose(m, m.flatten()[0].expand_as(m))  # the same value everywhere (CLS keeps to itself)


def test_uniform_attention_gives_a_uniform_map():
    n = 10
    attentions = [torch.full((1, 2, n, n), 1 / n) for _ in range(3)]
    m = rollout_map(attentions, grid=(3, 3))
    assert torch.allclose(m, torch.full_like(m, m[0, 0, 0, 0].item())) and m[0, 0, 0, 0] > 0


def test_cls_row_on_one_patch_lights_that_patch():
    m = rollout_map([cls_looks_at(6)] * 3)  # 16 patches, 4 x 4, row-major: patch 6 is row 1, column 2
    flat = m.flatten()
    assert int(flat.argmax()) == 6
    assert flat[6] > 0.4 and torch.all(flat[torch.arange(16) != 6] == 0)


def test_each_image_of_a_batch_gets_its_own_map():
    attention = torch.cat([cls_looks_at(3), cls_looks_at(12)])  # batch of 2 with different patterns
    m = rollout_map([attention, attention])
    assert m.shape == (2, 1, 4, 4)
    assert int(m[0].flatten().argmax()) == 3 and int(m[1].flatten().argmax()) == 12
    single = rollout_map([cls_looks_at(12)] * 2)
    torch.testing.assert_close(m[1:], single)


def test_rows_stay_normalised_keepdim():
    torch.manual_seed(0)
    attentions = [torch.rand(3, 4, 9, 9).softmax(-1) * torch.rand(3, 4, 9, 1) for _ in range(5)]  # rows of unequal sums
    r = attention_rollout(attentions, discard_ratio=0.3)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 9))
    # One layer by hand: (A + I) / 2 with each ROW divided by its own sum.
    fused = attentions[0].mean(1)
    a = (fused + torch.eye(9)) / 2
    torch.testing.assert_close(attention_rollout(attentions[:1]), a / a.sum(-1, keepdim=True))


def test_head_fusion_mean_max_min():
    a = torch.zeros(1, 3, 2, 2)
    a[0, :, 0, 1] = torch.tensor([0.2, 0.5, 0.8])
    assert fuse_heads(a, "mean")[0, 0, 1].item() == pytest.approx(0.5)
    assert fuse_heads(a, "max")[0, 0, 1].item() == pytest.approx(0.8)
    assert fuse_heads(a, "min")[0, 0, 1].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="mean"):
        fuse_heads(a, "median")


def test_discard_never_drops_the_cls_entry_and_works_per_image():
    fused = torch.rand(2, 5, 5) + 1
    fused[1] *= 10  # the second image on another scale: per-image ranking
    fused[:, 0, 0] = 0.001  # the smallest entry of both images
    out = discard_lowest(fused, 0.5)
    assert torch.all(out[:, 0, 0] == 0.001)
    assert [int((o == 0).sum()) for o in out] == [12, 12]  # int(25 * 0.5) entries dropped in each image
    for f, o in zip(fused, out):  # the dropped entries are the lowest ones (the CLS entry aside)
        others = torch.ones(5, 5, dtype=torch.bool)
        others[0, 0] = False
        dropped, kept = f[(o == 0) & others], f[(o != 0) & others]
        assert dropped.max() <= kept.min()
    assert torch.equal(discard_lowest(fused, 0.0), fused)


def test_gradient_weighted_fusion_keeps_only_positive_evidence():
    a = torch.full((1, 2, 5, 5), 0.2)
    g = torch.zeros(1, 2, 5, 5)
    g[0, 0, 0, 3] = 1.0  # head 0: attention CLS -> token 3 raises the output
    g[0, 1, 0, 4] = -1.0  # head 1: CLS -> token 4 lowers it
    fused = fuse_heads(a, gradient=g)
    assert fused[0, 0, 3] > 0 and fused[0, 0, 4] == 0 and fused.sum() == fused[0, 0, 3]
    m = rollout_map([a], gradients=[g], grid=(2, 2))
    assert int(m.flatten().argmax()) == 2  # token 3 = patch 2


def test_any_grid_and_image_size():
    m = rollout_map([identity(1, 1, 1 + 4 * 8)], image_size=(64, 128))  # non-square patch grid from the aspect ratio
    assert m.shape == (1, 1, 64, 128)
    assert patch_grid(32, (64, 128)) == (4, 8) and patch_grid(196) == (14, 14)
    with pytest.raises(ValueError, match="grid"):
        patch_grid(10)
    m = rollout_map([cls_looks_at(0, n=1 + 64)] * 2, image_size=(128, 128))
    assert m.shape == (1, 1, 128, 128) and m[0, 0, :16, :16].mean() > m[0, 0, 64:, 64:].mean()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        attention_rollout([torch.rand(2, 5, 5)])
    with pytest.raises(ValueError, match="layer 1"):
        attention_rollout([identity(1, 2, 5), identity(2, 2, 5)])
