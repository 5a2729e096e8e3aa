import pytest
import torch
import torch.nn.functional as F

from medvq.maps.alm import alignment_loss_map
from medvq.maps.residual import perceptual_map, residual_map
from medvq.maps.smoothing import gaussian_smooth
from medvq.models.quantizer import VectorQuantizer, code_usage
from medvq.models.vqvae.anomaly_map import compute_maps
from medvq.models.vqvae.model import VQVAE, VQVAEConfig

SMALL = dict(hidden_channels=16, residual_channels=8, residual_layers=1, embedding_dim=8, codebook_size=16)


@pytest.mark.parametrize(
    "size, downsample, latent",
    [(64, 2, 16), (64, 3, 8), (128, 2, 32), (96, 1, 48)],
)
def test_shapes(size, downsample, latent):
    model = VQVAE(VQVAEConfig(downsample_layers=downsample, **SMALL))
    out = model(torch.rand(2, 1, size, size))
    assert out.reconstruction.shape == (2, 1, size, size)
    assert out.quantizer.indices.shape == (2, latent, latent)
    assert out.quantizer.latents.shape == (2, 8, latent, latent)
    assert torch.isclose(out.loss, out.reconstruction_loss + out.commitment_loss)


def test_decode_codes_equals_reconstruction():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**SMALL))
    model(torch.rand(4, 1, 32, 32))  # k-means initialisation on a first training batch
    model.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        again = model.decode_codes(out.quantizer.indices)
    torch.testing.assert_close(again, out.reconstruction, atol=1e-5, rtol=1e-5)


def test_input_size_not_multiple_of_stride_is_rejected():
    model = VQVAE(VQVAEConfig(**SMALL, downsample_layers=2))
    with pytest.raises(ValueError, match="multiple of the model stride 4"):
        model(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))


def test_commitment_loss_is_beta_times_encoder_distance_and_trains_encoder_only():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, beta=0.5, kmeans_init=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    e = vq.codebook[out.indices].permute(0, 3, 1, 2)
    expected = 0.5 * ((z.detach() - e) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert not vq.codebook.requires_grad  # the codebook follows EMA updates


def test_quantizer_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=32, kmeans_init=False).eval()
    z = torch.randn(2, 8, 4, 4)
    ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.latents.dtype == torch.float32
    # bf16 input rounding may move a few borderline latents; distances themselves are fp32
    assert (out.indices == ref.indices).float().mean() > 0.9


def test_ema_codebook_moves_towards_data_and_usage_is_measured():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=4, ema_decay=0.5, kmeans_init=True)
    centres = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [3.0, -3.0], [-3.0, -3.0]])
    for _ in range(20):
        pts = centres[torch.randint(0, 4, (64,))] + 0.1 * torch.randn(64, 2)
        vq(pts.T.reshape(1, 2, 8, 8))
    dist = torch.cdist(vq.codebook, centres).min(dim=0).values
    assert (dist < 0.5).all(), "every cluster centre has a code near it"
    perplexity, used = code_usage(torch.tensor([10.0, 10.0, 10.0, 10.0]))
    assert perplexity == pytest.approx(4.0) and used == 1.0
    perplexity, used = code_usage(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert perplexity == pytest.approx(1.0) and used == 0.25


def test_alm_by_hand():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    latents = torch.tensor([[[[0.0, 2.0]], [[0.0, 1.0]]]])  # (1, D=2, h=1, w=2): z = [0,0] and [2,1]
    indices = torch.tensor([[[0, 1]]])
    alm = alignment_loss_map(latents, codebook, indices)
    # position 0: exact code -> 0; position 1: ((2-1)^2 + (1-1)^2) / 2 = 0.5
    torch.testing.assert_close(alm, torch.tensor([[[[0.0, 0.5]]]]))
    up = alignment_loss_map(latents, codebook, indices, size=(4, 8))
    assert up.shape == (1, 1, 4, 8) and up[..., 0].max() < up[..., -1].min()


def test_residual_and_smoothing():
    x = torch.zeros(1, 1, 8, 8)
    r = torch.zeros(1, 1, 8, 8)
    r[0, 0, 2, 3] = 0.5
    res = residual_map(x, r)
    assert res[0, 0, 2, 3] == 0.5 and res.sum() == 0.5
    smooth = gaussian_smooth(torch.ones(2, 1, 10, 12) * 3, sigma=2.0)
    torch.testing.assert_close(smooth, torch.ones(2, 1, 10, 12) * 3)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1
    s = gaussian_smooth(spike, 1.5)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-5) and s[0, 0, 10, 10] == s.max()


@pytest.mark.parametrize("shape, sigma", [((3, 2, 37, 50), 2.0), ((1, 1, 5, 9), 2.0), ((2, 1, 1, 7), 1.0), ((1, 3, 64, 64), 0.6)])
def test_smoothing_by_band_matrix_equals_reflect_padded_convolution(shape, sigma):
    """The band matrices hold the kernel and the reflect padding: the same blur as padding and convolving
    each axis (kernel radius clipped below the side, as reflect padding needs)."""
    import math

    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    b, c, h, w = shape
    radius = max(1, math.ceil(3 * sigma))
    expected = maps.reshape(b * c, 1, h, w)
    for axis, side in ((3, w), (2, h)):
        r = min(radius, side - 1)
        if r == 0:
            continue
        taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = (taps / taps.sum()).view(1, 1, 1, -1) if axis == 3 else (taps / taps.sum()).view(1, 1, -1, 1)
        pad = (r, r, 0, 0) if axis == 3 else (0, 0, r, r)
        expected = F.conv2d(F.pad(expected, pad, mode="reflect"), kernel)
    torch.testing.assert_close(gaussian_smooth(maps, sigma), expected.reshape(shape), rtol=0, atol=1e-6)


def test_vqvae_maps_light_up_where_the_input_is_unlike_training():
    """A VQ-VAE fitted to smooth images: a planted bright square raises both maps there (the perceptual map,
    which needs textured scans of a size ImageNet features mean something at, is tested below)."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**SMALL, dropout=0.0, downsample_layers=2, perceptual_map=False))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yy = torch.linspace(0, 1, 32).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    for _ in range(150):
        x = (yy * torch.rand(16, 1, 1, 1)).clone()
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    test = (yy * 0.5).repeat(1, 1, 1, 1).clone()
    test[..., 8:16, 8:16] = 1.0
    maps = compute_maps(model, test)
    inside = torch.zeros_like(test, dtype=torch.bool)
    inside[..., 8:16, 8:16] = True
    for name in ("residual", "alm"):
        m = maps.maps[name]
        assert m[inside].mean() > 2 * m[~inside].mean(), name


def test_perceptual_map_is_one_minus_the_cosine_of_the_features():
    """By hand on a known embedding (2 x 2 average pooling of two channels): 0 where the reconstruction's
    features point the same way, whatever their length; 1 - cos elsewhere; resized to the image."""
    image = torch.rand(2, 1, 8, 8)
    embed = lambda x: F.avg_pool2d(torch.cat([x, 1 - x], dim=1), 2)
    assert perceptual_map(embed, image, image).abs().max() < 1e-6
    reconstruction = image.clone()
    reconstruction[:, :, :4, :4] = 1 - image[:, :, :4, :4]
    a, b = embed(image), embed(reconstruction)
    expected = 1 - (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    torch.testing.assert_close(perceptual_map(embed, image, reconstruction), F.interpolate(expected, size=(8, 8), mode="bilinear", align_corners=False).clamp_min(0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        perceptual_map(embed, image, image[..., :4])


def test_perceptual_map_lights_up_where_the_reconstruction_misses_a_lesion():
    """With the VQ-VAE's own frozen ImageNet features: a textured scan whose 'reconstruction' lost a bright
    blob (as a model of normal scans would) scores the blob far above the rest; an identical one scores 0."""
    model = VQVAE(VQVAEConfig(**SMALL))
    model.features.load_imagenet()
    torch.manual_seed(0)
    texture = F.interpolate(torch.rand(1, 1, 32, 32), size=(128, 128), mode="bilinear", align_corners=False) * 0.5
    lesion = texture.clone()
    lesion[..., 48:80, 48:80] = 0.95
    inside = torch.zeros_like(lesion, dtype=torch.bool)
    inside[..., 52:76, 52:76] = True
    far = torch.ones_like(inside)
    far[..., 32:96, 32:96] = False
    m = perceptual_map(model.features.embed, lesion, texture)
    assert m[inside].mean() > 5 * m[far].mean()
    assert perceptual_map(model.features.embed, texture, texture).abs().max() < 1e-5
