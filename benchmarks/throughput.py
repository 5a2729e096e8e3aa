"""Training and inference throughput of the VQ-VAE (images/s) in fp32 and bf16, in one run.

    python benchmarks/throughput.py                       # default model, 128 px, CPU
    python benchmarks/throughput.py --image-size 64 --batch-size 32 --compile
    python benchmarks/throughput.py --device cuda --batch-size 64

Each setting runs warm-up steps, then times ``--steps`` steps on random images (throughput does not
depend on pixel values). Ratios in the printed table are relative to the fp32 row of the same run.
Writes a JSON file with the figures when --json is given.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from throughput_common import parser, sync, write_json

from medvq.config import RunConfig
from medvq.models.vqvae.anomaly_map import compute_maps
from medvq.models.vqvae.model import VQVAE


def measure(model_config, *, device, image_size, batch_size, steps, warmup, bf16, channels_last, compile_model, train):
    torch.manual_seed(0)
    model = VQVAE(model_config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.encoder.compile()
        model.decoder.compile()
    x = torch.rand(batch_size, 1, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train(train)

    def step():
        if train:
            with autocast:
                out = model(x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast:
                compute_maps(model, x)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * batch_size / seconds, "warmup_s": first}


def main() -> None:
    p = parser(__doc__, steps=20, warmup=3)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first step)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = RunConfig().model
    settings = [
        ("fp32", dict(bf16=False, channels_last=False, compile_model=False)),
        ("fp32 + channels_last", dict(bf16=False, channels_last=True, compile_model=False)),
        ("bf16 autocast", dict(bf16=True, channels_last=False, compile_model=False)),
        ("bf16 autocast + channels_last", dict(bf16=True, channels_last=True, compile_model=False)),
    ]
    if args.compile:
        settings.append(("bf16 + channels_last + compile", dict(bf16=True, channels_last=True, compile_model=True)))
    rows = []
    for phase, train in (("train", True), ("inference", False)):
        base = None
        for name, kw in settings:
            r = measure(cfg, device=device, image_size=args.image_size, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, train=train, **kw)
            base = base or r["images_per_s"]
            rows.append({"phase": phase, "setting": name, **r, "ratio_vs_fp32": r["images_per_s"] / base})
            print(f"{phase:9s} {name:32s} {r['images_per_s']:8.1f} img/s  x{r['images_per_s'] / base:4.2f}  (warm-up {r['warmup_s']:.1f}s)", flush=True)
    write_json(args.json, args, device, model=cfg.model_dump(), rows=rows)


if __name__ == "__main__":
    main()
