import math

import numpy as np
import pytest
import torch

from medvq.evaluation.reconstruction import mse_per_image, psnr_per_image, reconstruction_metrics, spread_indices, ssim_per_image, summarize


def _images(n: int = 3, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.5 + 0.4 * torch.sin(8 * xx) * torch.cos(6 * yy)
    return torch.stack([base * (0.6 + 0.2 * k) for k in range(n)])[:, None].clamp(0, 1)


def test_perfect_reconstruction():
    x = _images()
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3), atol=1e-5)
    assert torch.isinf(psnr_per_image(x, x)).all()
    assert (mse_per_image(x, x) == 0).all()


def test_psnr_and_mse_by_hand_and_ssim_falls_with_noise():
    x = _images()
    y = (x + 0.1).clamp(0, 1)
    mse = ((y - x) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(mse_per_image(y, x), mse)
    torch.testing.assert_close(psnr_per_image(y, x), 10 * torch.log10(1.0 / mse))
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    noisier = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s1, s2 = ssim_per_image(noisy, x), ssim_per_image(noisier, x)
    assert (s1 > s2).all() and (s1 < 1).all() and s1.shape == (3,)


def test_reconstructions_are_clipped_and_inputs_checked_against_the_data_range():
    x = _images()
    torch.testing.assert_close(mse_per_image(x + 5.0, x), ((1.0 - x) ** 2).flatten(1).mean(1))  # clipped to [0, 1]
    with pytest.raises(ValueError, match=r"outside the data range \[0, 1\]"):
        ssim_per_image(x, x * 255)  # 8-bit intensities with data_range 1 would be the seed's defect
    with pytest.raises(ValueError, match="must both be"):
        psnr_per_image(x[:2], x)
    # the same images on a 0..255 scale with data_range 255 give the same SSIM and PSNR
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(ssim_per_image(noisy * 255, x * 255, data_range=255.0), ssim_per_image(noisy, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(psnr_per_image(noisy * 255, x * 255, data_range=255.0), psnr_per_image(noisy, x), atol=1e-3, rtol=1e-4)


def test_fp32_under_bf16_autocast():
    x = _images()
    noisy = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = ssim_per_image(noisy.bfloat16(), x)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ssim_per_image(noisy.bfloat16().float(), x))


def test_batched_metrics_and_summary():
    x = _images(5)
    y = (x + 0.05).clamp(0, 1)
    per = reconstruction_metrics(y, x, batch_size=2)
    assert set(per) == {"ssim", "psnr", "mse"} and all(v.shape == (5,) for v in per.values())
    np.testing.assert_allclose(per["ssim"], ssim_per_image(y, x).numpy(), rtol=1e-6)
    s = summarize(per, ["A", "A", "B", "B", "B"])
    assert s["n_images"] == 5 and s["data_range"] == 1.0
    assert s["ssim"] == pytest.approx(per["ssim"].mean()) and s["by_class"]["B"]["n_images"] == 3
    assert s["by_class"]["A"]["psnr"] == pytest.approx(per["psnr"][:2].mean())
    perfect = summarize(reconstruction_metrics(x, x), None)
    assert perfect["psnr"] is None and perfect["mse"] == 0 and "by_class" not in perfect, "inf PSNR is stored as null (valid JSON)"
    assert not math.isnan(perfect["ssim"])


def test_spread_indices_from_worst_to_best():
    values = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    assert spread_indices(values, 3) == [1, 2, 0]
    assert spread_indices(values, 10) == [1, 4, 2, 3, 0]
    assert spread_indices(np.array([]), 4) == []
