"""The two models as plain ``nn.Module``s. No Ray code here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNNArgs:
    num_classes: int
    in_channels: int = 1
    height: int = 28
    width: int = 28
    conv_channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 64


def _conv_out(size: int) -> int:
    # conv3 (valid) -> pool2 -> conv3 -> pool2 -> conv3
    size = (size - 2) // 2
    size = (size - 2) // 2
    return size - 2


class ImageCNN(nn.Module):
    """Conv(32)-Pool-Conv(64)-Pool-Conv(64)-Flatten-Linear(64)-Linear(classes); returns logits."""

    def __init__(self, args: CNNArgs):
        super().__init__()
        c1, c2, c3 = args.conv_channels
        out_h, out_w = _conv_out(args.height), _conv_out(args.width)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"input {args.height}x{args.width} is too small for three 3x3 convs and two pools"
            )
        self.features = nn.Sequential(
            nn.Conv2d(args.in_channels, c1, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * out_h * out_w, args.hidden),
            nn.ReLU(),
            nn.Linear(args.hidden, args.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # pixels as preprocessing stores them, scaled on the model's device
            x = x.float().mul_(1 / 255)
        # x: (B, C, H, W) float in [0, 1]
        return self.head(self.features(x))  # (B, classes)


@dataclass(frozen=True)
class GRUArgs:
    num_classes: int
    vocab_size: int = 10_000
    embed_dim: int = 64
    hidden: int = 64
    dense: int = 64


class TextGRU(nn.Module):
    """Embedding-GRU-Linear-Linear, classifying from the last *valid* hidden state of each sequence."""

    def __init__(self, args: GRUArgs):
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.embed_dim, padding_idx=0)
        self.gru = nn.GRU(args.embed_dim, args.hidden, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(args.hidden, args.dense), nn.ReLU(), nn.Linear(args.dense, args.num_classes)
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # tokens: (B, T) int64, right-padded with 0; lengths: (B,) >= 1
        emb = self.embed(tokens)  # (B, T, E)
        packed = nn.utils.rnn.pack_padded_sequence(
            emb, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, last = self.gru(packed)  # last: (1, B, H), the state after each sequence's last real token
        return self.head(last[0])  # (B, classes)


def fast_layout(model: nn.Module) -> nn.Module:
    """The memory layout dlbatch runs a model in (same values; checkpoints load into either layout).

    The CNN's weights go channels_last (NHWC), which makes PyTorch take oneDNN's faster NHWC convolutions on
    CPU (docs/PERFORMANCE.md) and is the layout tensor cores use on GPU. Inputs may stay NCHW: a conv
    follows its weight's layout."""
    if isinstance(model, ImageCNN) or getattr(model, "head_prefix", None):  # the seed CNN or a backbone
        return model.to(memory_format=torch.channels_last)
    return model


def build_model(kind: str, model_args: dict) -> nn.Module:
    """Build a model from its kind ("image" / "text") and the args dict saved in checkpoints."""
    if kind == "image" and model_args.get("arch", "seed") != "seed":
        from dlbatch.backbone import BackboneArgs, ImageBackbone

        args = {**model_args, "mean": tuple(model_args["mean"]), "std": tuple(model_args["std"])}
        return ImageBackbone(BackboneArgs(**args))
    if kind == "image":
        args = dict(model_args)
        args["conv_channels"] = tuple(args.get("conv_channels", CNNArgs.conv_channels))
        return ImageCNN(CNNArgs(**args))
    if kind == "text":
        return TextGRU(GRUArgs(**model_args))
    raise ValueError(f"unknown model kind {kind!r}")


def model_args_for(task_cfg, num_classes: int, vocab_len: int | None = None) -> dict:
    """Model args (as saved in checkpoints) from a typed task config and facts learned from the data."""
    model = task_cfg.model
    if hasattr(task_cfg, "image") and model.arch != "seed":
        from dlbatch.backbone import backbone_args

        return asdict(backbone_args(model, task_cfg.image, num_classes))
    if hasattr(task_cfg, "image"):
        img = task_cfg.image
        return asdict(
            CNNArgs(
                num_classes=num_classes,
                in_channels=img.channels,
                height=img.height,
                width=img.width,
                conv_channels=tuple(model.conv_channels),
                hidden=model.hidden,
            )
        )
    return asdict(
        GRUArgs(
            num_classes=num_classes,
            vocab_size=vocab_len,
            embed_dim=model.embed_dim,
            hidden=model.hidden,
            dense=model.dense,
        )
    )


def forward_batch(model: nn.Module, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the model on a preprocessed batch (the columns written by ``dlbatch.data``)."""
    if kind == "image":
        return model(batch["x"])
    return model(batch["tokens"], batch["length"])
