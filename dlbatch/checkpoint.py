"""Checkpoint layout, written by rank 0 every epoch and read by resume, evaluation and inference.

A checkpoint directory holds:
- ``model.pt``: the unwrapped model's ``state_dict`` (tensors only, loaded with ``weights_only=True``);
- ``optimizer.pt``: the ``torch.optim.AdamW`` ``state_dict`` (same);
- ``scheduler.pt``: the learning-rate scheduler's ``state_dict`` (its step count: a resumed fit goes on
  with the schedule where it stopped);
- ``meta.json``: epoch, model kind and args, label names, metrics and the task config;
- ``tokenizer.json`` (text models): the tokenizer in its own JSON format, its SHA-256 in ``meta.json``.
The tokenizer and label map travel with the weights, so a model is never used with another one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlbatch.errors import CheckpointError
from dlbatch.models import build_model
from dlbatch.tokenizer import TOKENIZER_FILE, tokenizer_sha256, vocab_len

MODEL_FILE, OPTIM_FILE, SCHED_FILE, META_FILE = "model.pt", "optimizer.pt", "scheduler.pt", "meta.json"


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt_dir / MODEL_FILE)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), ckpt_dir / OPTIM_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), ckpt_dir / SCHED_FILE)
    meta = dict(meta)
    tokenizer = meta.pop("tokenizer", None)
    if tokenizer is not None:
        (ckpt_dir / TOKENIZER_FILE).write_text(tokenizer)
        meta["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
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
    if meta["kind"] == "text":
        meta["tokenizer"] = _load_tokenizer(Path(ckpt_dir), meta)
    return meta


def _load_tokenizer(ckpt_dir: Path, meta: dict[str, Any]) -> str:
    """The text model's own tokenizer (its JSON), checked against the SHA-256 its training recorded."""
    path = ckpt_dir / TOKENIZER_FILE
    if "tokenizer_sha256" not in meta:
        raise CheckpointError(
            f"{ckpt_dir}: a text model from an older dlbatch (a word vocabulary, no {TOKENIZER_FILE}); "
            "retrain it with this version (jobs/train.py) to score with it"
        )
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from checkpoint (a text model needs its tokenizer)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the tokenizer ({_first_line(err)})") from None
    if tokenizer_sha256(text) != meta["tokenizer_sha256"]:
        raise CheckpointError(
            f"{path}: not the tokenizer this model was trained with (SHA-256 differs from {META_FILE}'s)"
        )
    try:
        vocab_len(text)
    except Exception as err:  # tokenizers raises a plain Exception for malformed JSON
        raise CheckpointError(f"{path}: not a valid tokenizer ({_first_line(err)})") from None
    return text


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
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and scheduler in place for a resumed run; returns the metadata (``epoch``
    included)."""
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
    sched_path = Path(ckpt_dir) / SCHED_FILE
    if scheduler is not None and sched_path.exists():
        scheduler.load_state_dict(_load_tensors(sched_path, "cpu"))
    return meta
