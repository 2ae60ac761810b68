"""The training recipe: AdamW with weight decay, a learning rate tied to the global batch, warm-up then
cosine decay per step, and random resized crops and flips for colour photos. Pure functions of the typed
config; the worker loop (train.py) builds these once per rank and checkpoints their state.

The learning-rate rule: ``train.lr`` is the peak rate for a global batch of ``train.lr_batch`` samples. The
rate used is ``lr * (global_batch / lr_batch) ** p`` with p = 1/2 for ``lr_scaling=sqrt`` (the rule for
Adam-family optimizers), 1 for ``linear`` (the rule for SGD) and 0 for ``none``; the global batch is
``num_workers x batch_size``. So the same config trains alike on 2 or 8 workers: more workers take fewer,
larger steps with a larger rate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from dlbatch.config import AugmentConfig, TrainConfig

SCALING_POWER = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


@dataclass(frozen=True)
class Schedule:
    """One fit's learning-rate plan, made by the driver from the config and the training split's rows."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay: str  # "cosine" | "constant"
    weight_decay: float
    freeze_steps: int = 0  # a backbone's layers stay still for these first steps (only its new head learns)
    rows: int = 0  # the training rows it was planned for
    freeze_epochs: int = 0


def for_world(schedule: Schedule, train: TrainConfig, world: int) -> Schedule:
    """The schedule for the world size the fit runs at (elastic training starts, shrinks and grows): the
    rate scaled to that global batch and the steps of that many equal shards."""
    return plan_schedule(train, schedule.rows, schedule.freeze_epochs, world)


def resized_step(step: int, saved_world: int, world: int) -> int:
    """A step count taken at ``saved_world`` workers as the steps that train as many samples at ``world``
    (the same share of the epoch; rounded up, so that no part of the epoch is trained twice over)."""
    return step if saved_world == world else math.ceil(step * saved_world / world)


def scaled_lr(train: TrainConfig, num_workers: int | None = None) -> float:
    """``train.lr`` scaled from its reference batch (``lr_batch``) to the global batch."""
    global_batch = (num_workers or train.max_workers) * train.batch_size
    return train.lr * (global_batch / train.lr_batch) ** SCALING_POWER[train.lr_scaling]


def steps_per_epoch(rows: int, train: TrainConfig, num_workers: int | None = None) -> int:
    """Optimizer steps in one epoch: Ray Train deals each rank an equal shard of the rows."""
    per_rank = max(rows // (num_workers or train.max_workers), 1)
    return math.ceil(per_rank / train.batch_size)


def plan_schedule(
    train: TrainConfig, rows: int, freeze_epochs: int = 0, num_workers: int | None = None
) -> Schedule:
    """The fit's schedule, from the training rows as the Parquet footers count them (a rejected row makes
    the fit a step or so shorter than planned; the rate then simply stays at the end of its decay)."""
    per_epoch = steps_per_epoch(rows, train, num_workers)
    total = train.epochs * per_epoch
    warmup = min(round(train.warmup_fraction * total), total - 1)
    return Schedule(scaled_lr(train, num_workers), warmup, total, train.decay, train.weight_decay,
                    freeze_epochs * per_epoch, rows, freeze_epochs)  # fmt: skip


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str, frozen_steps: int = 0) -> float:
    """The rate of optimizer step ``step`` (from 0) as a share of the peak: a linear warm-up over
    ``warmup_steps``, then constant or a cosine from the peak to zero at ``total_steps``; zero for the
    first ``frozen_steps`` (a frozen backbone's groups)."""
    if step < frozen_steps:
        return 0.0
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_for(model: nn.Module, schedule: Schedule) -> torch.optim.AdamW:
    """AdamW, decaying the weight matrices and kernels only: biases and norm scales keep their size. A
    backbone's layers and its new head (``head_prefix``) are groups of their own, so that the layers can be
    frozen (``frozen_steps``: their rate is zero) while the head learns."""
    head = getattr(model, "head_prefix", None)
    groups = []
    for name_part in ("body", "head"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if head is not None:
            named = [(n, p) for n, p in named if n.startswith(head) == (name_part == "head")]
        elif name_part == "head":
            break  # the seed CNN is trained whole: one part
        frozen = schedule.freeze_steps if head is not None and name_part == "body" else 0
        for decayed in (True, False):
            params = [p for _, p in named if (p.ndim >= 2) == decayed]
            if params:
                groups.append({"params": params, "weight_decay": schedule.weight_decay if decayed else 0.0,
                               "frozen_steps": frozen})  # fmt: skip
    return torch.optim.AdamW(groups, lr=schedule.peak_lr)


def scheduler_for(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    # Partials (not lambdas) so that the scheduler's state_dict holds plain numbers only.
    factors = [
        functools.partial(
            lr_factor,
            warmup_steps=schedule.warmup_steps,
            total_steps=schedule.total_steps,
            decay=schedule.decay,
            frozen_steps=group.get("frozen_steps", 0),
        )  # fmt: skip
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def augments(aug: AugmentConfig, channels: int) -> bool:
    """Whether training images are augmented: ``auto`` is on for colour photos, off for 1-channel images
    (digits and scans, where a flip or a crop can change the class)."""
    return channels == 3 if aug.enabled == "auto" else bool(aug.enabled)


def augmentation(aug: AugmentConfig, height: int, width: int) -> nn.Module:
    """Random resized crops (back to height x width) and horizontal flips on a batch of images, on the
    batch's own device: kornia's augmentations work on whole tensors, so a GPU worker augments on the GPU."""
    import kornia.augmentation as K

    steps: list[nn.Module] = [
        K.RandomResizedCrop((height, width), scale=tuple(aug.crop_scale), ratio=(3 / 4, 4 / 3))
    ]
    if aug.flip:
        steps.append(K.RandomHorizontalFlip())
    return nn.Sequential(*steps)
