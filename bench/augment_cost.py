"""What the photo augmentation (random resized crop + flip, dlbatch/recipe.py) costs per training step:
the seed CNN's forward, backward and AdamW step on one batch, with and without augmenting the batch first,
on this machine's device. Alternating rounds, medians.

    python bench/augment_cost.py [--size 64] [--batch 64] [--steps 30] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dlbatch.config import AugmentConfig, TrainConfig
from dlbatch.models import CNNArgs, ImageCNN, fast_layout
from dlbatch.recipe import augmentation, optimizer_for, plan_schedule
from dlbatch.train import _augmented


def steps_per_s(size: int, batch: int, steps: int, device: str, augment: bool) -> float:
    torch.manual_seed(0)
    model = fast_layout(ImageCNN(CNNArgs(num_classes=5, in_channels=3, height=size, width=size)).to(device))
    opt = optimizer_for(model, plan_schedule(TrainConfig(), 10_000))
    aug = augmentation(AugmentConfig(), size, size).to(device) if augment else None
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    for timed in (False, True):  # one untimed pass first
        t0 = time.perf_counter()
        for _ in range(steps if timed else 3):
            inputs = _augmented({"x": x, "y": y}, aug)
            loss = F.cross_entropy(model(inputs["x"]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for augment in (r % 2 == 0, r % 2 == 1):  # who goes first alternates
            rates[augment].append(steps_per_s(args.size, args.batch, args.steps, args.device, augment))
    plain, augmented = statistics.median(rates[False]), statistics.median(rates[True])
    result = {"device": args.device, "size": args.size, "batch": args.batch, "steps_per_s_plain": round(plain, 2),
              "steps_per_s_augmented": round(augmented, 2), "ratio": round(augmented / plain, 3)}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
