"""Latent priors: NLL maps by hand, causality, position embeddings, cached sampling, losses, frozen parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvq.config import build_config
from medvq.models.classifier.model import ClassifierConfig
from medvq.models.prior.anomaly_map import COMBINATIONS, compute_maps, nll_map
from medvq.models.prior.lightning import PriorModule
from medvq.maps.nll import code_nll
from medvq.models.prior.model import LatentPrior, PriorConfig, prior_loss
from medvq.models.vqvae.model import VQVAEConfig
from medvq.scoring.calibration import NormalCalibration

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # modules tested outside a Trainer

SIZE = 32  # images 32 x 32, VQ-VAE stride 4 -> 8 x 8 codes
K = 16
VQ = VQVAEConfig(hidden_channels=16, residual_channels=8, residual_layers=1, embedding_dim=8, codebook_size=K, kmeans_init=False, downsample_layers=2)


def prior_config(**kw) -> PriorConfig:
    base = dict(
        vqvae_config=VQ, latent_grid=[SIZE // 4, SIZE // 4], embed_dim=16, layers=2, heads=2, dropout=0.0,
        fusion_channels=16, fusion_blocks=1, encoder_stages=[2, 3],
    )
    return PriorConfig(**{**base, **kw})


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def ar_model(seed: int = 0) -> LatentPrior:
    torch.manual_seed(seed)
    return LatentPrior(prior_config(kind="autoregressive")).eval()


def random_codes(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (n, 8, 8), generator=torch.Generator().manual_seed(seed))


# --- the NLL map --------------------------------------------------------------------------------------------
def test_nll_map_is_minus_log_softmax_of_the_true_code_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g)
    codes = torch.randint(0, 5, (2, 3, 4), generator=g)
    nll = code_nll(logits, codes)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                row = [float(logits[b, k, i, j]) for k in range(5)]
                expected = -(row[int(codes[b, i, j])] - math.log(sum(math.exp(v) for v in row)))
                assert float(nll[b, i, j]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert torch.equal(nll_map(logits, codes)[:, 0], nll)
    up = nll_map(logits, codes, size=(6, 8))
    assert up.shape == (2, 1, 6, 8)
    torch.testing.assert_close(up, F.interpolate(nll[:, None], size=(6, 8), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("kind", ["autoregressive", "fusion"])
def test_prior_maps_nll_is_the_model_likelihood_of_the_vqvae_codes(kind):
    torch.manual_seed(0)
    model = LatentPrior(prior_config(kind=kind)).eval()
    x = images()
    out = compute_maps(model, x)
    assert set(out.maps) == {"nll", "residual", "alm", "perceptual"} and all(m.shape == (3, 1, SIZE, SIZE) for m in out.maps.values())
    codes = model.codes(x).indices
    assert torch.equal(out.codes, codes)
    by_hand = -F.log_softmax(model.logits(x, codes).float(), dim=1).gather(1, codes[:, None])  # (B, 1, 8, 8)
    torch.testing.assert_close(out.maps["nll"], F.interpolate(by_hand, size=(SIZE, SIZE), mode="bilinear", align_corners=False))
    torch.testing.assert_close(model(x), by_hand[:, 0])


# --- autoregressive transformer ---------------------------------------------------------------------------------
def test_changing_a_later_code_never_changes_earlier_logits():
    model = ar_model()
    codes = random_codes()
    base = model.head(codes).reshape(2, K, -1)
    for t in (0, 5, 31, 63):
        changed = codes.clone().reshape(2, -1)
        changed[:, t] = (changed[:, t] + 1) % K
        out = model.head(changed.reshape(2, 8, 8)).reshape(2, K, -1)
        torch.testing.assert_close(out[..., : t + 1], base[..., : t + 1], rtol=0, atol=1e-6)  # logits at t predict code t: they see codes < t only
        if t < 63:
            assert (out[..., t + 1] - base[..., t + 1]).abs().max() > 1e-4, f"code {t} must inform the prediction of code {t + 1}"


def test_position_embedding_reaches_every_token_including_the_start_token():
    model = ar_model()
    codes = random_codes()
    base = model.head(codes).reshape(2, K, -1)
    bump = 0.5 * torch.randn(model.head.pos_emb.shape[-1], generator=torch.Generator().manual_seed(2))  # not a constant: LayerNorm removes those
    for t in (0, 1, 30, 63):
        with torch.no_grad():
            model.head.pos_emb[0, t] += bump
        out = model.head(codes).reshape(2, K, -1)
        with torch.no_grad():
            model.head.pos_emb[0, t] -= bump
        assert (out[..., t] - base[..., t]).abs().max() > 1e-4, f"position {t} does not reach its token"
        torch.testing.assert_close(out[..., :t], base[..., :t], rtol=0, atol=1e-6)
    model.train()
    loss = prior_loss(model.head(codes), codes)
    loss.backward()
    assert (model.head.pos_emb.grad[0].abs().sum(dim=1) > 0).all(), "every position row gets a gradient"


def test_cached_steps_give_the_teacher_forced_logits():
    model = ar_model()
    codes = random_codes()
    full = model.head(codes).reshape(2, K, -1)
    seq = codes.reshape(2, -1)
    token, cache = torch.full((2,), model.head.start), None
    with torch.no_grad():
        for t in range(64):
            logits, cache = model.head.step(token, t, cache)
            torch.testing.assert_close(logits, full[..., t], rtol=1e-4, atol=1e-5)
            token = seq[:, t]


def test_sampling_shapes_seed_and_top_k():
    model = ar_model()
    a = model.sample(3, generator=torch.Generator().manual_seed(4))
    b = model.sample(3, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 8, 8) and torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < K
    with torch.no_grad():  # make code 7 by far the most likely everywhere: top-1 sampling must always draw it
        model.head.head.bias.zero_()
        model.head.head.bias[7] = 50.0
    assert (model.sample(2, top_k=1, generator=torch.Generator().manual_seed(0)) == 7).all()
    with pytest.raises(ValueError, match="fusion prior"):
        LatentPrior(prior_config(kind="fusion")).sample(1)


# --- training: one loss, frozen parts ---------------------------------------------------------------------
def test_prior_loss_moves_the_class_axis_like_a_flat_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 3, 5, generator=g)
    codes = torch.randint(0, K, (2, 3, 5), generator=g)
    flat = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, K), codes.reshape(-1))  # codes last, then flattened
    torch.testing.assert_close(prior_loss(logits, codes), flat)
    torch.testing.assert_close(prior_loss(logits, codes), code_nll(logits, codes).mean())
    wrong = F.cross_entropy(logits.reshape(-1, K), codes.reshape(-1))  # the seed's reshape without moving the class axis
    assert not torch.allclose(wrong, flat)


@pytest.mark.parametrize("kind", ["autoregressive", "fusion"])
def test_validation_loss_is_the_training_loss_on_the_same_batch_in_eval_mode(kind):
    torch.manual_seed(0)
    module = PriorModule(prior_config(kind=kind, label_smoothing=0.1).model_dump(mode="json"))
    module.eval()
    batch = {"image": images(4)}
    train_loss = module.training_step(batch, 0)  # the training formula, here in eval mode (no dropout)
    module.validation_step(batch, 0)
    val = float(module.val_sums[0] / module.val_sums[4])
    assert val == pytest.approx(float(train_loss.detach()), rel=1e-6)
    m = module.model
    codes = m.codes(batch["image"]).indices
    logits = m.logits(batch["image"], codes)
    flat = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, K), codes.reshape(-1), label_smoothing=0.1)
    assert val == pytest.approx(float(flat.detach()), rel=1e-5)


@pytest.mark.parametrize("features", ["spatial", "cls"])
def test_frozen_parts_stay_in_eval_mode_and_get_no_gradient(features):
    torch.manual_seed(0)
    module = PriorModule(prior_config(kind="fusion", fusion_features=features, dropout=0.2).model_dump(mode="json"))
    model = module.model
    module.train()
    frozen = [*model.vqvae.modules(), *model.encoder.modules()]
    assert not any(m.training for m in frozen) and all(m.training for m in model.head.modules())
    assert all(not p.requires_grad for m in (model.vqvae, model.encoder) for p in m.parameters())
    before = {k: v.clone() for k, v in model.vqvae.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    x = images(4)
    codes_a = model.codes(x).indices
    loss = module.training_step({"image": x}, 0)
    loss.backward()
    assert all(p.grad is None for m in (model.vqvae, model.encoder) for p in m.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert {p for p in model.trainable_parameters()} == set(model.head.parameters())
    for k, v in model.vqvae.state_dict().items():  # no EMA codebook update, no BatchNorm statistics update
        assert torch.equal(v, before[k]), k
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert torch.equal(model.codes(x).indices, codes_a), "targets do not depend on the mode (no dropout in the frozen VQ-VAE)"


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="fusion", fusion_features="spatial"),
        dict(kind="fusion", fusion_features="cls"),
        dict(kind="fusion", encoder="vit-run:/somewhere", encoder_config=ClassifierConfig(arch="vit", patch_size=8, embed_dim=16, depth=1, num_heads=2, vit_input_size=SIZE, classes=["NORMAL", "ABNORMAL"])),
        dict(kind="fusion", fusion_features="cls", encoder="vit-run:/somewhere", encoder_config=ClassifierConfig(arch="vit", patch_size=8, embed_dim=16, depth=1, num_heads=2, vit_input_size=SIZE, classes=["NORMAL", "ABNORMAL"])),
        dict(kind="autoregressive"),
    ],
)
def test_logit_shapes(kw):
    torch.manual_seed(0)
    model = LatentPrior(prior_config(**kw)).eval()
    x = images(2)
    codes = model.codes(x).indices
    assert codes.shape == (2, 8, 8)
    assert model.logits(x, codes).shape == (2, K, 8, 8)


def test_config_checks():
    with pytest.raises(ValueError, match="encoder"):
        PriorConfig(encoder="resnet")
    with pytest.raises(ValueError, match="vqvae"):
        LatentPrior(PriorConfig())
    with pytest.raises(ValueError, match="divisible"):
        LatentPrior(prior_config(kind="autoregressive", embed_dim=18, heads=4))
    model = ar_model()
    with pytest.raises(ValueError, match="latent grid"):
        model.head(torch.zeros(1, 4, 4, dtype=torch.long))
    cfg = build_config({"method": "prior", "model": prior_config(kind="autoregressive").model_dump(mode="json")})
    assert cfg.model.stride == 4 and cfg.model.vqvae_config == VQ


def test_named_combinations_are_means_of_standardised_maps():
    g = torch.Generator().manual_seed(0)
    raw = {n: torch.rand(6, 1, 8, 8, generator=g) * s for n, s in (("nll", 3.0), ("residual", 0.1), ("alm", 0.01))}
    pairs = [c for c in COMBINATIONS if set(c.split("+")) <= set(raw)]
    cal = NormalCalibration(combine=["nll", "residual", "alm"], combinations=pairs).fit(raw)
    z = cal.standardize(raw)
    assert set(z) == {"nll", "residual", "alm", "combined", *pairs}
    torch.testing.assert_close(z["nll+alm"], (z["nll"] + z["alm"]) / 2)
    torch.testing.assert_close(z["combined"], (z["nll"] + z["residual"] + z["alm"]) / 3)
    again = NormalCalibration.from_dict(cal.to_dict())
    assert again.combinations == pairs
    np.testing.assert_array_equal(again.image_scores(again.standardize(raw))["nll+residual"], cal.image_scores(z)["nll+residual"])


def test_a_prior_stored_before_the_perceptual_map_keeps_its_maps():
    """Its stored VQ-VAE config lacks ``perceptual_map``: that VQ-VAE had no feature network, so neither has the
    rebuilt one, and the prior gives the maps it gave; a prior written now keeps the VQ-VAE's setting."""
    from medvq.models.prior.config import PriorConfig
    from medvq.models.prior.method import map_names_for

    stored = {k: v for k, v in VQ.model_dump(mode="json").items() if k != "perceptual_map"}
    old = PriorConfig.model_validate({**prior_config(kind="autoregressive").model_dump(mode="json"), "vqvae_config": stored})
    assert old.vqvae_config.perceptual_map is False and map_names_for(old) == ("nll", "residual", "alm")
    assert LatentPrior(old).vqvae.features is None
    now = PriorConfig.model_validate(prior_config(kind="autoregressive").model_dump(mode="json"))
    assert now.vqvae_config.perceptual_map is True and "perceptual" in map_names_for(now)
