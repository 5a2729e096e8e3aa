import math

import pytest
import torch

from medvq.config import build_config
from medvq.errors import MedvqError
from medvq.models.registry import get_method
from medvq.models.vqvae.model import VQVAE, VQVAEConfig
from medvq.models.vqvae2.anomaly_map import MAP_NAMES, compute_maps
from medvq.models.vqvae2.model import VQVAE2, VQVAE2Config, code_bits, equal_budget_vqvae

SMALL = dict(hidden_channels=16, residual_channels=8, residual_layers=1, embedding_dim=8, codebook_size_top=16, codebook_size_bottom=32)


@pytest.mark.parametrize(
    "height, width, bottom, top, bottom_grid, top_grid",
    [(64, 64, 2, 1, (16, 16), (8, 8)), (128, 128, 2, 1, (32, 32), (16, 16)), (64, 96, 2, 2, (16, 24), (4, 6)), (64, 64, 1, 1, (32, 32), (16, 16)), (96, 64, 3, 1, (12, 8), (6, 4))],
)
def test_shapes(height, width, bottom, top, bottom_grid, top_grid):
    model = VQVAE2(VQVAE2Config(bottom_downsample_layers=bottom, top_downsample_layers=top, **SMALL))
    out = model(torch.rand(2, 1, height, width))
    assert out.reconstruction.shape == (2, 1, height, width)
    assert out.bottom.indices.shape == (2, *bottom_grid) and out.top.indices.shape == (2, *top_grid)
    assert out.bottom.latents.shape == (2, 8, *bottom_grid) and out.top.latents.shape == (2, 8, *top_grid)
    assert out.top.indices.max() < 16 and out.bottom.indices.max() < 32
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.top.loss + out.bottom.loss)
    assert model.stride == 2 ** (bottom + top)


def test_decode_codes_equals_reconstruction():
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**SMALL))
    model(torch.rand(4, 1, 64, 64))  # k-means initialisation of both codebooks on a first training batch
    model.eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        again = model.decode_codes(out.top.indices, out.bottom.indices)
    torch.testing.assert_close(again, out.reconstruction, atol=1e-5, rtol=1e-5)
    other = (out.top.indices + 1 + torch.randint(0, 15, out.top.indices.shape)) % 16  # every top code changed
    assert not torch.allclose(model.decode_codes(other, out.bottom.indices), out.reconstruction, atol=1e-4), "the top codes matter"


@pytest.mark.parametrize("upsampling", ["transpose", "resize"])
def test_one_code_everywhere_decodes_to_a_flat_image_only_with_resize_upsampling(upsampling):
    # Flat regions (the background of an MRI slice) map to one code; resize-convolutions keep them flat,
    # transposed convolutions lay a checkerboard over them (Odena et al. 2016).
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**SMALL, upsampling=upsampling, kmeans_init=False)).eval()
    top, bottom = torch.full((1, 32, 32), 3), torch.full((1, 64, 64), 5)  # a 256 px image
    with torch.no_grad():
        image = model.decode_codes(top, bottom)
    assert image.shape == (1, 1, 256, 256)
    interior = image[0, 0, 96:160, 96:160]  # far from the zero padding at the borders
    if upsampling == "resize":
        assert float(interior.std()) < 1e-6 * (1 + float(interior.abs().mean()))
    else:
        assert float(interior.std()) > 1e-4


def test_the_decoded_top_conditions_the_bottom_quantizer():
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**SMALL, kmeans_init=False)).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        features, top_latents = model.encode(x)
        top_a, bottom_a = model.quantize(features, top_latents)
        top_b, bottom_b = model.quantize(features, top_latents + 3 * torch.randn_like(top_latents))
        top_c, bottom_c = model.quantize(features, top_latents + 1e-6)
    assert (top_a.indices != top_b.indices).any()
    assert not torch.allclose(bottom_a.latents, bottom_b.latents), "other top codes, other bottom latents for the same image features"
    assert torch.equal(top_a.indices, top_c.indices)
    torch.testing.assert_close(bottom_a.latents, bottom_c.latents), "the bottom depends on the top only through its codes"
    # in training, the bottom level's loss reaches the top encoder through the decoded top
    model.train()
    top, bottom = model.quantize(*model.encode(x))
    bottom.loss.backward()
    grads = [p.grad for p in model.encoder_top.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_input_checks():
    model = VQVAE2(VQVAE2Config(**SMALL))
    with pytest.raises(ValueError, match="multiple of the model stride 8"):
        model(torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(MedvqError, match="multiple of the model stride 16"):
        build_config({"method": "vqvae2", "data": {"image_size": 72}, "model": {"top_downsample_layers": 2}})


def test_equal_code_budget():
    config = VQVAE2Config(codebook_size_top=512, codebook_size_bottom=512)
    single = equal_budget_vqvae(config)
    assert isinstance(single, VQVAEConfig) and single.stride == config.bottom_stride
    assert single.codebook_size == 2435  # 512 * 512 ** (1/4)
    for size in (64, 128, 256):
        assert code_bits(config, size) == pytest.approx(code_bits(single, size), rel=1e-3)
    assert code_bits(config, 128) == 32 * 32 * 9 + 16 * 16 * 9
    deeper = equal_budget_vqvae(VQVAE2Config(top_downsample_layers=2, codebook_size_top=256, codebook_size_bottom=64))
    assert deeper.codebook_size == round(64 * 256 ** (1 / 16))
    assert code_bits(VQVAE2Config(top_downsample_layers=2, codebook_size_top=256, codebook_size_bottom=64), 128) == pytest.approx(
        (32 * 32) * math.log2(64) + (8 * 8) * 8
    )
    assert (single.hidden_channels, single.embedding_dim, single.residual_layers) == (config.hidden_channels, config.embedding_dim, config.residual_layers)
    VQVAE(single)(torch.rand(1, 1, 32, 32))  # builds and runs


def test_maps_and_registry():
    method = get_method("vqvae2")
    assert method.map_names == MAP_NAMES == ("residual", "alm_top", "alm_bottom", "perceptual") and method.normal_only
    model = method.build_model(VQVAE2Config(**SMALL))
    model.train()
    images = torch.rand(3, 1, 64, 64)
    out = compute_maps(model, images)
    assert model.training, "the maps run in eval mode and restore the mode afterwards"
    assert set(out.maps) == set(MAP_NAMES) - {"perceptual"}  # off by default for the VQ-VAE-2
    for m in out.maps.values():
        assert m.shape == (3, 1, 64, 64) and m.dtype == torch.float32 and (m >= 0).all()
    assert out.codes.shape == (3, 16, 16) and out.extras["top_codes"].shape == (3, 8, 8)
    torch.testing.assert_close(out.maps["residual"], (images - out.reconstruction.clamp(0, 1)).abs())
    with pytest.raises(ValueError, match="unknown map"):
        compute_maps(model, images, ["alm"])
    with pytest.raises(ValueError, match="without the perceptual map"):
        compute_maps(model, images, ["perceptual"])
    with_map = method.build_model(VQVAE2Config(**SMALL, perceptual_map=True))
    assert set(compute_maps(with_map, images).maps) == set(MAP_NAMES) and with_map.features is not None


def test_vqvae2_maps_light_up_where_the_input_is_unlike_training():
    """A VQ-VAE-2 fitted to smooth gradients: a planted bright square raises the residual and the bottom ALM there."""
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**SMALL))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yy = torch.linspace(0, 1, 32).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    for _ in range(100):
        out = model((yy * torch.rand(8, 1, 1, 1)).clone())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    test = (yy * 0.5).clone()
    test[..., 8:16, 8:16] = 1.0
    maps = compute_maps(model, test).maps
    inside = torch.zeros_like(test, dtype=torch.bool)
    inside[..., 8:16, 8:16] = True
    for name in ("residual", "alm_bottom"):
        assert maps[name][inside].mean() > 2 * maps[name][~inside].mean(), name


def test_runs_written_before_the_upsampling_option_load_with_transposed_convolutions(tmp_path):
    from medvq.engine.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.create()
    run.write_config(build_config({"method": "vqvae2", "model": SMALL}))
    assert run.read_config().model.upsampling == "resize"  # today's default, written into every run's config.yaml
    text = run.config.read_text()
    assert "upsampling: resize" in text
    run.config.write_text(text.replace("  upsampling: resize\n", ""))  # as a run from before the option
    assert run.read_config().model.upsampling == "transpose"
    model = VQVAE2(run.read_config().model)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.modules())
