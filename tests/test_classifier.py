"""Classifier architectures, ImageNet weights and their gray adaptation, class weights, explanation maps."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medvq.config import build_config
from medvq.errors import CheckpointError, DatasetError
from medvq.models.classifier.anomaly_map import compute_maps, map_names_for
from medvq.models.classifier.lightning import ClassifierModule, augment, histogram_auroc
from medvq.models.classifier.model import Classifier, ClassifierConfig
from medvq.models.backbones.weights import fold_input_conv, read_state_dict
from medvq.models.classifier.pretrained import bundled_weights, load_pretrained
from medvq.models.classifier.training import balanced_weights, resolve_classifier_config

VIT = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "arch, size, task, extra, params_m",
    [
        ("vit", 64, "binary", dict(patch_size=8, vit_input_size=64, **VIT), (0.02, 0.1)),
        ("vit", 128, "4class", dict(patch_size=16, vit_input_size=128), (2.5, 3.0)),
        ("vit", 64, "binary", dict(patch_size=8, vit_input_size=64, vit_stem="conv", **VIT), (0.02, 0.1)),
        ("resnet18", 64, "binary", {}, (11.0, 11.3)),
        ("resnet50", 96, "4class", {}, (23.4, 23.6)),
        ("efficientnet-lite0", 128, "binary", {}, (3.3, 3.5)),
    ],
)
def test_shapes(arch, size, task, extra, params_m):
    model = Classifier(ClassifierConfig(arch=arch, task=task, **extra)).eval()
    n = 2 if task == "binary" else 4
    out = model(torch.rand(3, 1, size, size))
    assert out.logits.shape == (3, n)
    assert params_m[0] < sum(p.numel() for p in model.parameters()) / 1e6 < params_m[1]
    maps = compute_maps(model, torch.rand(2, 1, size, size))
    assert set(maps.maps) == set(map_names_for(model.config))
    assert all(m.shape == (2, 1, size, size) and m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps.maps.values())
    p = maps.scores["p_abnormal"]
    assert p.shape == (2,) and ((0 <= p) & (p <= 1)).all()
    torch.testing.assert_close(p, 1 - maps.extras["probabilities"][:, 0])
    with pytest.raises(ValueError, match="multiple of the model stride"):
        model(torch.rand(1, 1, size + 4, size + 4))


def test_vit_position_embedding_has_the_cls_row_first_and_resizes():
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(arch="vit", patch_size=8, vit_input_size=32, **VIT)).eval()
    net = model.net
    assert net.pos_embed.shape == (1, 1 + 4 * 4, 32)
    with torch.no_grad():  # tokens entering the first block = position embedding alone
        net.patch_embed.proj.weight.zero_()
        net.patch_embed.proj.bias.zero_()
        net.cls_token.zero_()
    seen = {}
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(torch.rand(2, 1, 32, 32))
    torch.testing.assert_close(seen["x"], net.pos_embed.expand(2, -1, -1))
    assert model(torch.rand(2, 1, 48, 48)).logits.shape == (2, 2)  # 6 x 6 grid: interpolated
    assert net.position_embedding((6, 6)).shape == (1, 37, 32)
    torch.testing.assert_close(net.position_embedding((6, 6))[:, 0], net.pos_embed[:, 0])  # CLS row untouched


def test_attention_weights_path_gives_the_same_logits():
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(arch="vit", patch_size=8, vit_input_size=32, **VIT)).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        fast, explicit = model(x), model(x, return_attention=True)
    torch.testing.assert_close(fast.logits, explicit.logits, atol=1e-5, rtol=1e-5)
    assert len(explicit.attentions) == 2 and explicit.attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(explicit.attentions[1].sum(-1), torch.ones(2, 2, 17))


def test_rollout_needs_a_vit():
    model = Classifier(ClassifierConfig(arch="resnet18"))
    with pytest.raises(ValueError, match="needs --arch vit"):
        compute_maps(model, torch.rand(1, 1, 64, 64), ["rollout"])


def test_explanation_maps_are_per_image():
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(arch="vit", patch_size=8, vit_input_size=64, **VIT))
    x = torch.rand(3, 1, 64, 64)
    batch = compute_maps(model, x)
    alone = compute_maps(model, x[2:])
    for name in batch.maps:
        torch.testing.assert_close(batch.maps[name][2:], alone.maps[name], atol=1e-5, rtol=1e-4)
    assert model.training, "the model's mode is restored"


# --- ImageNet weights -----------------------------------------------------------------------------
def test_pretrained_lite0_loads_every_tensor():
    model = Classifier(ClassifierConfig(arch="efficientnet-lite0"))
    report = load_pretrained(model)  # 'imagenet' is the default for this arch
    file = read_state_dict(bundled_weights("efficientnet-lite0"))
    assert sorted(report.skipped_head) == ["_fc.bias", "_fc.weight"]
    ours = set(model.net.state_dict()) - {"_fc.weight", "_fc.bias"}
    assert set(report.loaded) == ours == (set(file) - {"_fc.weight", "_fc.bias"}) | {"_conv_stem.offset"}
    state = model.net.state_dict()
    for key in ours - {"_conv_stem.weight", "_conv_stem.offset"}:
        assert torch.equal(state[key], file[key]), key
    assert state["_conv_stem.weight"].shape == (32, 1, 3, 3)


def _rgb_reference(arch: str, state: dict, mean, std) -> Classifier:
    """The network as trained on ImageNet: 3 channels, 1000 classes, fed normalised RGB."""
    model = Classifier(ClassifierConfig(arch=arch, in_channels=3, task="4class", classes=[f"c{i}" for i in range(1000)]))
    model.net.load_state_dict({**state, **{k: torch.zeros_like(v) for k, v in model.net.state_dict().items() if k.endswith(".offset")}})
    return model.eval()


def _gray_adapted(arch: str, source, head: dict) -> Classifier:
    model = Classifier(ClassifierConfig(arch=arch, task="4class", classes=[f"c{i}" for i in range(1000)], pretrained=str(source)))
    load_pretrained(model)
    model.net.load_state_dict(head, strict=False)  # the same head, to compare logits
    return model.eval()


def test_gray_lite0_equals_the_rgb_network_on_a_replicated_gray_image():
    file = read_state_dict(bundled_weights("efficientnet-lite0"))
    mean = std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    rgb = _rgb_reference("efficientnet-lite0", file, mean, std)
    gray = _gray_adapted("efficientnet-lite0", "imagenet", {k: file[k] for k in ("_fc.weight", "_fc.bias")})
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = rgb(((x.expand(-1, 3, -1, -1) - mean) / std)).logits
        got = gray(x).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_gray_adaptation_is_exact_at_the_borders_with_unequal_channel_means(tmp_path):
    """ImageNet statistics differ per channel; the folded offset keeps zero padding exact (ResNet conv1 pads 3 px)."""
    torch.manual_seed(0)
    source = Classifier(ClassifierConfig(arch="resnet18", in_channels=3, task="4class", classes=[f"c{i}" for i in range(1000)]))
    for m in source.modules():  # give BatchNorm non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    state = {k: v for k, v in source.net.state_dict().items() if not k.endswith(".offset")}  # torchvision has no offset
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = _rgb_reference("resnet18", state, mean, std)
    gray = _gray_adapted("resnet18", path, {k: state[k] for k in ("fc.weight", "fc.bias")})
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x).logits, rgb((x.expand(-1, 3, -1, -1) - mean) / std).logits, atol=1e-3, rtol=1e-4)
        # a plain sum of the filters (no normalisation folded in) would be far off
        w, _ = fold_input_conv(state["conv1.weight"], [0, 0, 0], [1, 1, 1], 1)
        assert torch.allclose(w, state["conv1.weight"].sum(1, keepdim=True))
        assert not torch.allclose(gray.net.conv1.weight, w)


def test_wrong_weights_are_refused_naming_the_file(tmp_path):
    model = Classifier(ClassifierConfig(arch="resnet18", pretrained=str(bundled_weights("efficientnet-lite0"))))
    with pytest.raises(CheckpointError, match=r"efficientnet-lite0-57934424.pth: weights do not fit --arch resnet18 \(missing \['bn1"):
        load_pretrained(model)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(model, tmp_path / "nothing.pth")
    with pytest.raises(Exception, match="no ImageNet weights ship with medvq for resnet18"):
        load_pretrained(model, "imagenet")
    with pytest.raises(Exception, match="linear patch stem"):
        load_pretrained(Classifier(ClassifierConfig(arch="vit", vit_stem="conv")), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="power-of-two"):
        ClassifierConfig(arch="vit", vit_stem="conv", patch_size=12)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_weights_files_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_state_dict(path)


# --- classes and class weights ---------------------------------------------------------------------
def test_balanced_class_weights():
    assert balanced_weights([0, 0, 0, 1], 2, ["NORMAL", "ABNORMAL"]) == pytest.approx([4 / 6, 2.0])
    with pytest.raises(DatasetError, match="DME have no training images"):
        balanced_weights([0, 1, 1], 3, ["NORMAL", "CNV", "DME"])


def test_run_config_gets_classes_weights_and_input_size_from_the_data():
    labels = ["NORMAL"] * 6 + ["CNV"] * 3 + ["DRUSEN"] * 2 + ["DME"]
    cfg = build_config({"method": "classifier", "data": {"image_size": 96}, "model": {"arch": "vit", "task": "4class", "patch_size": 16}})
    resolved = resolve_classifier_config(cfg, labels)
    m = resolved.model
    assert m.classes == ["NORMAL", "CNV", "DME", "DRUSEN"] and m.vit_input_size == 96 and m.pretrained == "none"
    assert m.class_weights == pytest.approx([12 / (4 * 6), 12 / (4 * 3), 12 / (4 * 1), 12 / (4 * 2)], abs=1e-5)
    assert resolve_classifier_config(resolved, labels).model == m  # resolving again changes nothing
    binary = resolve_classifier_config(build_config({"method": "classifier", "model": {"arch": "efficientnet-lite0"}}), labels).model
    assert binary.classes == ["NORMAL", "ABNORMAL"] and binary.class_weights == pytest.approx([1.0, 1.0]) and binary.pretrained == "imagenet"
    with pytest.raises(DatasetError, match="no NORMAL images"):
        resolve_classifier_config(cfg, ["CNV", "DME"])


def test_loss_is_weighted_cross_entropy():
    cfg = ClassifierConfig(arch="resnet18", classes=["NORMAL", "ABNORMAL"], class_weights=[0.5, 3.0])
    module = ClassifierModule(cfg.model_dump(), channels_last=False)
    logits, target = torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    expected = F.cross_entropy(logits, target, weight=torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(module._loss(logits, target), expected)
    assert not torch.isclose(expected, F.cross_entropy(logits, target))


def test_abnormal_probability_and_histogram_auroc():
    model = Classifier(ClassifierConfig(arch="resnet18", task="4class"))
    logits = torch.randn(5, 4)
    torch.testing.assert_close(model.abnormal_probability(logits), 1 - logits.softmax(1)[:, 0])
    rng = np.random.default_rng(0)
    pos, neg = rng.beta(5, 2, 300), rng.beta(2, 5, 400)
    hist = lambda s: torch.bincount(torch.as_tensor((s * 1000).astype(int)), minlength=1000)
    exact = roc_auc_score(np.r_[np.ones(300), np.zeros(400)], np.r_[pos, neg])
    assert histogram_auroc(hist(pos), hist(neg)) == pytest.approx(exact, abs=2e-3)


def test_augmentation_keeps_range_and_shape():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    y = augment(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
