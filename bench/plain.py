"""A plain single-process PyTorch baseline: pyarrow read, the same preprocessing and model, no Ray.

Used by ``bench/parity.py`` (accuracy) and ``bench/run.py`` (throughput) as the reference point.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch
import torch.nn.functional as F

from dlbatch.config import task_config
from dlbatch.models import build_model, fast_layout, forward_batch
from dlbatch.predict import preprocess_spec
from dlbatch.preprocess import preprocess_batch


def load_split(path: str, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    table = pads.dataset(path, format="parquet").to_table()
    cols = preprocess_batch(table, spec)
    ok = np.asarray(cols["reject_reason"].is_null())
    names = ["x"] if spec["kind"] == "image" else ["tokens", "length"]
    return {k: torch.from_numpy(np.ascontiguousarray(cols[k][ok])) for k in [*names, "y"]}


def batches(data: dict[str, torch.Tensor], batch_size: int, perm: torch.Tensor | None = None):
    n = len(data["y"])
    idx = perm if perm is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        sel = idx[start : start + batch_size]
        yield {k: v[sel] for k, v in data.items()}


def train_plain(
    kind: str,
    meta: dict[str, Any],
    train: dict,
    val: dict,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    channels_last: bool = False,
    device: str = "cpu",
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """``channels_last``: the CNN in the layout dlbatch trains it in (``fast_layout``); off, the model as
    plain PyTorch builds it. On ``cuda`` the data is moved batch by batch, as a plain loop would."""
    torch.manual_seed(seed)
    model = build_model(kind, meta["model_args"]).to(device)
    if channels_last:
        model = fast_layout(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        model.train()
        t0, started_at = time.perf_counter(), time.time()
        for batch in batches(train, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = F.cross_entropy(forward_batch(model, kind, batch), batch["y"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch,
                "samples_per_s": len(train["y"]) / train_s,
                "val_accuracy": accuracy(model, kind, val),
                # Wall clock of the training pass, as dlbatch's history has it (GPU utilization windows).
                "train_started_at": started_at,
                "train_s": train_s,
            }
        )
    return model.cpu(), history


@torch.inference_mode()
def accuracy(model: torch.nn.Module, kind: str, data: dict) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        (forward_batch(model, kind, {k: v.to(device) for k, v in b.items()}).argmax(1).cpu() == b["y"])
        .sum()
        .item()
        for b in batches(data, 1024)
    )
    return correct / len(data["y"])


def spec_for(kind: str, meta: dict[str, Any]) -> dict[str, Any]:
    return preprocess_spec(kind, task_config(kind, meta["config"]), meta)
