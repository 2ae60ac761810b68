"""What the recipe's parts cost per training step on this machine's device: the seed CNN's forward,
backward and AdamW step on one batch of colour images, against the same with the photo augmentation
(random resized crop + flip, dlbatch/recipe.py) and with a ResNet-18-shaped transformers backbone
(image.model.arch=resnet; random weights, the same cost as pretrained ones). Alternating rounds, medians;
samples/s and ratios to the seed CNN measured in the same rounds.

    python bench/recipe_cost.py [--size 64] [--batch 64] [--steps 20] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from dlbatch.backbone import BackboneArgs
from dlbatch.config import AugmentConfig, TrainConfig
from dlbatch.models import CNNArgs, ImageCNN, build_model, fast_layout
from dlbatch.recipe import augmentation, optimizer_for, plan_schedule
from dlbatch.train import _augmented

RESNET18 = {
    "layer_type": "basic",
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
}


def _model(kind: str, size: int) -> torch.nn.Module:
    if kind == "resnet18":
        args = BackboneArgs(num_classes=5, arch="resnet", library_config=RESNET18, height=size, width=size)
        return build_model("image", asdict(args))
    return ImageCNN(CNNArgs(num_classes=5, in_channels=3, height=size, width=size))


def steps_per_s(size: int, batch: int, steps: int, device: str, kind: str) -> float:
    torch.manual_seed(0)
    model = fast_layout(_model(kind, size).to(device))
    opt = optimizer_for(model, plan_schedule(TrainConfig(), 10_000))
    aug = augmentation(AugmentConfig(), size, size).to(device) if kind == "augmented" else None
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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    kinds = ("seed", "augmented", "resnet18")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:  # who goes first rotates
            rates[kind].append(steps_per_s(args.size, args.batch, args.steps, args.device, kind))
    seed = statistics.median(rates["seed"])
    result = {"device": args.device, "size": args.size, "batch": args.batch}
    for kind in kinds:
        median = statistics.median(rates[kind])
        result[kind] = {"samples_per_s": round(median * args.batch), "ratio_to_seed": round(median / seed, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
