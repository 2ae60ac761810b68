"""Checkpoint layout, written by rank 0 every epoch and read by resume, evaluation and inference.

A checkpoint directory holds:
- ``model.pt``: the unwrapped model's ``state_dict`` (tensors only, loaded with ``weights_only=True``);
- ``optimizer.pt``: the optimizer's ``state_dict`` (same; ``torch.optim.Adam``'s layout, whether GPU
  training wrote it or CPU training's ``dlbatch.parallel.Adam``);
- ``meta.json``: epoch, model kind and args, label names, vocabulary, metrics and the task config.
The vocabulary and label map travel with the weights, so a model is never used with another one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlbatch.errors import CheckpointError
from dlbatch.models import build_model
from dlbatch.parallel import Adam

MODEL_FILE, OPTIM_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Adam | None,
    meta: dict[str, Any],
) -> None:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt_dir / MODEL_FILE)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), ckpt_dir / OPTIM_FILE)
    (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=1, default=str))


def load_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not a dlbatch checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({err})") from None
    for key in ("kind", "model_args", "label_names"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    return meta


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _load_tensors(path: Path, device: str | torch.device) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint path is input, and unrestricted unpickling of input is code execution.
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from checkpoint") from None
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise CheckpointError(f"{path}: cannot load checkpoint weights ({_first_line(err)})") from None


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Model (eval mode, on ``device``) and its metadata from a checkpoint directory."""
    meta = load_meta(ckpt_dir)
    model = build_model(meta["kind"], meta["model_args"])
    state = _load_tensors(Path(ckpt_dir) / MODEL_FILE, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not match the model in meta.json ({_first_line(err)})"
        ) from None
    return model.to(device).eval(), meta


def load_training_state(
    ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | Adam
) -> dict[str, Any]:
    """Restore model and optimizer in place for a resumed run; returns the metadata (``epoch`` included)."""
    meta = load_meta(ckpt_dir)
    model.load_state_dict(_load_tensors(Path(ckpt_dir) / MODEL_FILE, "cpu"))
    optim_path = Path(ckpt_dir) / OPTIM_FILE
    if optim_path.exists():
        try:
            optimizer.load_state_dict(_load_tensors(optim_path, "cpu"))
        except (ValueError, KeyError, TypeError) as err:  # made for another model or optimizer
            raise CheckpointError(
                f"{optim_path}: optimizer state does not fit this model ({_first_line(err)})"
            ) from None
    return meta
