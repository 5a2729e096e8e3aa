"""Grad-CAM on hand-made activations and on small networks whose answer is known."""

import pytest
import torch
from torch import nn

from medvq.maps.gradcam import GradCAM, grad_cam, layer_map, tokens_to_grid
from medvq.models.classifier.model import Classifier, ClassifierConfig


def test_grad_cam_weights_channels_by_mean_gradient_and_rectifies():
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, 1, 2] = 3.0  # channel 0: one hot spot
    a[0, 1] = 1.0  # channel 1: flat
    g = torch.zeros(1, 2, 4, 4)
    g[0, 0] = 0.5  # channel 0 raises the output
    g[0, 1] = -0.1  # channel 1 lowers it
    cam = grad_cam(a, g)
    expected = (0.5 * a[0, 0] - 0.1 * a[0, 1]).clamp(min=0)
    torch.testing.assert_close(cam[0, 0], expected)
    assert int(cam.flatten().argmax()) == 1 * 4 + 2
    up = grad_cam(a, g, size=(16, 16))
    assert up.shape == (1, 1, 16, 16) and up.min() >= 0


def test_tokens_go_back_to_their_patch_grid():
    b, d = 2, 3
    patches = torch.arange(b * 8 * d, dtype=torch.float32).reshape(b, 8, d)
    tokens = torch.cat([torch.full((b, 1, d), -1.0), patches], dim=1)  # CLS first
    grid = tokens_to_grid(tokens, prefix_tokens=1, image_size=(32, 64))  # 2 x 4 patches
    assert grid.shape == (b, d, 2, 4)
    assert torch.equal(grid[1, :, 1, 2], patches[1, 1 * 4 + 2])  # row-major
    assert (grid != -1).all()  # the CLS token is gone
    with pytest.raises(ValueError, match="grid"):
        tokens_to_grid(tokens[:, :8], prefix_tokens=1)  # 7 patch tokens form no square grid


class BlobNet(nn.Module):
    """Sums image brightness through a 1x1 convolution: the evidence lies where the image is bright."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 4, 1)
        nn.init.constant_(self.features.weight, 1.0)
        nn.init.zeros_(self.features.bias)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def blob(row: int, col: int, size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row : row + 4, col : col + 4] = 1.0
    return x


def test_cnn_grad_cam_points_at_the_evidence_for_each_image_of_a_batch():
    net = BlobNet().eval()
    cam = GradCAM(net, "features")
    images = torch.cat([blob(2, 2), blob(20, 24)])
    maps = cam(images, lambda logits: logits[:, 1])
    assert maps.shape == (2, 1, 32, 32)
    for m, (r, c) in zip(maps, [(2, 2), (20, 24)]):
        peak = divmod(int(m.flatten().argmax()), 32)
        assert r <= peak[0] < r + 4 and c <= peak[1] < c + 4
    torch.testing.assert_close(maps[1:], cam(images[1:], lambda logits: logits[:, 1]))  # batch-independent
    against = cam(images, lambda logits: logits[:, 0])  # the other class: negative evidence is rectified away
    assert against.abs().max() == 0


def test_vit_block_grad_cam_and_the_last_block_output_trap():
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(arch="vit", vit_input_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)).eval()
    x = torch.rand(3, 1, 64, 64)
    target = lambda out: out.logits[:, 1]
    m = GradCAM(model.net, "blocks.1.norm1", prefix_tokens=1)(x, target)
    assert m.shape == (3, 1, 64, 64) and m.max() > 0
    with pytest.raises(ValueError, match="does not influence"):  # the last block's patch tokens never reach the CLS head
        GradCAM(model.net, "blocks.1", prefix_tokens=1)(x, target)
    m = GradCAM(model.net, "patch_embed", prefix_tokens=1)(x, target)  # tokens before the CLS token joins them
    assert m.shape == (3, 1, 64, 64) and m.max() > 0
    with pytest.raises(ValueError, match="no layer 'blocks.9'"):
        GradCAM(model.net, "blocks.9", prefix_tokens=1)(x, target)


def test_layer_map_accepts_tokens_and_feature_maps():
    torch.manual_seed(1)
    tokens, grads = torch.rand(2, 1 + 16, 8), torch.rand(2, 1 + 16, 8)
    m = layer_map(tokens, grads, prefix_tokens=1, image_size=(64, 64))
    expected = grad_cam(tokens_to_grid(tokens, 1), tokens_to_grid(grads, 1), (64, 64))
    torch.testing.assert_close(m, expected)
