"""Inference throughput (images/s) of each classifier, with and without explanation maps.

    python benchmarks/classifier_throughput.py                          # 128 px, batch 16, CPU, fp32
    python benchmarks/classifier_throughput.py --bf16 --threads 2 --json out.json
    python benchmarks/classifier_throughput.py --arch vit --arch resnet18 --device cuda --batch-size 64

For every architecture: the logits alone (no gradients), then each explanation map on its own (Grad-CAM and
gradient rollout need one backward pass; rollout keeps the attention weights, no backward), then all maps
of the architecture together (one forward and one backward pass for all). Models are built from scratch
with the default configuration (weights do not change the speed); images are random (neither do pixel
values). Each setting runs --warmup batches, then times --steps batches.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from throughput_common import parser, sync, write_json

from medvq.models.classifier.anomaly_map import compute_maps, map_names_for
from medvq.models.classifier.model import Classifier, ClassifierConfig

ARCHS = ["vit", "resnet18", "resnet50", "efficientnet-lite0"]


def measure(model: Classifier, x: torch.Tensor, maps: tuple[str, ...] | None, *, steps: int, warmup: int, bf16: bool) -> float:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            if maps is None:
                with torch.no_grad():
                    model(x)
            else:
                compute_maps(model, x, maps)

    for _ in range(warmup):
        step()
    sync(x.device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(x.device)
    return steps * x.shape[0] / (time.perf_counter() - started)


def main() -> None:
    p = parser(__doc__, steps=5, warmup=2)
    p.add_argument("--arch", action="append", choices=ARCHS, help="architectures to measure (default: all)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (maps and probabilities are still computed in fp32)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=device)
    rows = []
    print(f"{'arch':20s} {'what':22s} {'images/s':>9s}  {'vs logits':>9s}")
    for arch in args.arch or ARCHS:
        config = ClassifierConfig(arch=arch, vit_input_size=args.image_size if arch == "vit" else None)
        model = Classifier(config).to(device).eval()
        names = map_names_for(config)
        settings = [("logits only", None), *[(n, (n,)) for n in names]]
        if len(names) > 1:
            settings.append(("all maps", names))
        base = None
        for what, maps in settings:
            rate = measure(model, x, maps, steps=args.steps, warmup=args.warmup, bf16=args.bf16)
            base = base or rate
            rows.append({"arch": arch, "what": what, "images_per_s": rate, "ratio_vs_logits": rate / base})
            print(f"{arch:20s} {what:22s} {rate:9.1f}  {rate / base:8.2f}x", flush=True)
    write_json(args.json, args, device, bf16=args.bf16, rows=rows)


if __name__ == "__main__":
    main()
