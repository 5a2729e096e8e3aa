"""A classifier's explanation maps, usable as anomaly maps: Grad-CAM, attention rollout, gradient rollout.

One forward pass (with the ViT's attention weights kept when a rollout is asked for) and one backward pass
give every requested map. The explained output is set by ``ClassifierConfig.explain_target``: the log-odds
of abnormal, ``log P(abnormal) - log P(normal)`` (default; the same quantity for binary and 4-class
models), or the logit of the predicted class. The image-level score of a classifier is P(abnormal),
returned as ``MapOutput.scores['p_abnormal']``; the class probabilities are in ``extras['probabilities']``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.maps.gradcam import LayerCapture, layer_map
from medvq.maps.rollout import rollout_map
from medvq.models.classifier.model import Classifier, ClassifierConfig
from medvq.models.classifier.method import MAP_NAMES, map_names_for  # noqa: F401 (declared with the method)

SCORE_NAME = "p_abnormal"


def explained_output(model: Classifier, logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B,) the scalar per image that gradient-based maps explain."""
    if model.config.explain_target == "predicted":
        return logits.float().gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
    return model.abnormal_log_odds(logits)


def compute_maps(model: Classifier, images: torch.Tensor, names: tuple[str, ...] | list[str] | None = None) -> MapOutput:
    """Run the model in eval mode on (B, C, H, W) images in [0, 1]; maps (B, 1, H, W), P(abnormal) (B,)."""
    c = model.config
    available = map_names_for(c)
    names = tuple(names) if names is not None else available
    why = " (attention rollout needs --arch vit)" if {"rollout", "gradient_rollout"} & (set(names) - set(available)) else ""
    check_map_names(names, available, f"a {c.arch} classifier", why)
    need_attention = bool({"rollout", "gradient_rollout"} & set(names))
    need_grad = bool({"gradcam", "gradient_rollout"} & set(names))
    size = tuple(images.shape[-2:])
    with evaluating(model):
        capture = LayerCapture(model.net, c.default_gradcam_layer) if "gradcam" in names else nullcontext()
        with torch.enable_grad() if need_grad else torch.no_grad(), capture:
            x = images.detach().requires_grad_(need_grad)  # a graph even if the weights are frozen
            out = model(x, return_attention=need_attention)
            logits = out.logits.float()
            wanted: list[torch.Tensor] = []
            if "gradcam" in names:
                wanted.append(capture.output)
            if "gradient_rollout" in names:
                wanted.extend(out.attentions)
            grads = list(torch.autograd.grad(explained_output(model, logits).sum(), wanted)) if wanted else []

    maps: dict[str, torch.Tensor] = {}
    if "gradcam" in names:
        maps["gradcam"] = layer_map(capture.output.detach(), grads.pop(0), prefix_tokens=model.prefix_tokens, image_size=size)
    settings = dict(prefix_tokens=model.prefix_tokens, image_size=size, head_fusion=c.rollout_head_fusion, discard_ratio=c.rollout_discard_ratio)
    if "rollout" in names:
        maps["rollout"] = rollout_map([a.detach() for a in out.attentions], **settings)
    if "gradient_rollout" in names:
        maps["gradient_rollout"] = rollout_map([a.detach() for a in out.attentions], gradients=grads, **settings)
    logits = logits.detach()
    return MapOutput(
        maps={k: maps[k] for k in names},
        scores={SCORE_NAME: model.abnormal_probability(logits)},
        extras={"probabilities": logits.softmax(dim=1), "logits": logits},
    )
