"""Ray Train worker loop (DDP) and the trainer builder.

Every epoch all ranks call ``ray.train.report`` once (it is a barrier); rank 0 attaches the checkpoint.
A restarted worker group resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlbatch.checkpoint import load_training_state, save_checkpoint
from dlbatch.cluster import use_assigned_cpus
from dlbatch.models import build_model, fast_layout, forward_batch

log = logging.getLogger(__name__)

FEATURES = {"image": ["x", "y"], "text": ["tokens", "length", "y"]}


def shard_name(split: str, rank: int) -> str:
    """Trainer dataset name of one rank's part of a split (also a log file name: no slashes)."""
    return f"{split}-rank{rank}"


def _autocast(device: torch.device):
    # bf16 autocast on GPU only: on CPU it slows small convs/GRUs down.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(shard, kind: str, batch_size: int, device: torch.device):
    """Tensor batches on ``device``. On a GPU, batches are collated into pinned host memory and copied
    asynchronously. The GRU's lengths stay on the host, where ``pack_padded_sequence`` wants them: a copy
    back from the GPU would stall every step."""
    dtypes = {"x": torch.float32, "y": torch.int64, "tokens": torch.int64, "length": torch.int64}
    on_gpu = device.type == "cuda"
    lengths_on_host = on_gpu and "length" in FEATURES[kind]
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={k: dtypes[k] for k in FEATURES[kind]},
        device="cpu" if lengths_on_host else device,
        pin_memory=on_gpu,
        prefetch_batches=2,
    )
    if not lengths_on_host:
        return batches
    return (
        {k: v if k == "length" else v.to(device, non_blocking=True) for k, v in batch.items()}
        for batch in batches
    )


def _noting_first(batches, noted: list[float]):
    """Pass batches through; append the wall-clock time of the first one to ``noted``."""
    for batch in batches:
        if not noted:
            noted.append(time.time())
        yield batch


def train_epoch(model: nn.Module, optimizer, batches, kind: str, device: torch.device) -> tuple[float, int]:
    """One pass over the shard. Returns (summed loss, samples).

    The loss is summed on the device and read once at the end: a ``.item()`` per step would make the host
    wait for the GPU every step instead of queueing the next one."""
    model.train()
    total_loss, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        with _autocast(device):
            logits = forward_batch(model, kind, batch)
        loss = F.cross_entropy(logits.float(), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = batch["y"].shape[0]
        total_loss += loss.detach() * n
        seen += n
    return total_loss.item(), seen


@torch.inference_mode()
def eval_epoch(model: nn.Module, batches, kind: str, device: torch.device) -> tuple[float, int, int]:
    """Returns (summed loss, correct, samples)."""
    model.eval()
    sums, seen = torch.zeros(2, dtype=torch.float64, device=device), 0  # summed loss, correct
    for batch in batches:
        with _autocast(device):
            logits = forward_batch(model, kind, batch).float()
        sums[0] += F.cross_entropy(logits, batch["y"], reduction="sum")
        sums[1] += (logits.argmax(1) == batch["y"]).sum()
        seen += batch["y"].shape[0]
    total_loss, correct = sums.tolist()
    return total_loss, int(correct), seen


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _quiet_per_epoch_logs() -> None:
    """Every epoch each rank would log Ray Data's execution banners for each of its two iterators; rank 0's
    one epoch line says it all. Warnings and errors still show."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry point. ``cfg`` is plain data: kind, model_args, train settings, checkpoint metadata."""
    import ray.train
    import ray.train.torch

    use_assigned_cpus()
    _quiet_per_epoch_logs()
    kind, tcfg = cfg["kind"], cfg["train"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(tcfg["seed"] + rank)
    device = ray.train.torch.get_device()

    model = fast_layout(build_model(kind, cfg["model_args"]).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg["lr"])
    start_epoch, history = 0, []
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as ckpt_dir:
            meta = load_training_state(ckpt_dir, model, optimizer)
        start_epoch, history = meta["epoch"] + 1, meta.get("history", [])
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model

    train_shard = ray.train.get_dataset_shard(shard_name("train", rank))
    val_shard = ray.train.get_dataset_shard(shard_name("val", rank))
    first_batch_at: list[float] = []
    for epoch in range(start_epoch, tcfg["epochs"]):
        t0, started_at = time.perf_counter(), time.time()
        batches = _batches(train_shard, kind, tcfg["batch_size"], device)
        loss_sum, seen = train_epoch(model, optimizer, _noting_first(batches, first_batch_at), kind, device)
        train_s = time.perf_counter() - t0
        val_loss, correct, val_seen = eval_epoch(
            model, _batches(val_shard, kind, tcfg["batch_size"], device), kind, device
        )
        loss_sum, seen, val_loss, correct, val_seen, sum_train_s = _all_reduce(
            [loss_sum, seen, val_loss, correct, val_seen, train_s], device
        )
        train_s = sum_train_s / ctx.get_world_size()  # mean over ranks
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val_loss / max(val_seen, 1),
            "val_accuracy": correct / max(val_seen, 1),
            "val_rows": int(val_seen),
            "samples_per_s": seen / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - t0,
            # Wall clock of the training pass (rank 0's start, mean length): lines up with other samplers,
            # e.g. the benchmark's GPU utilization.
            "train_started_at": started_at,
            "train_s": train_s,
            "resumed_from_epoch": start_epoch - 1 if start_epoch else None,
            # Seconds from the driver's fit() to this worker group's first training batch: controller and
            # worker start, process group, model, dataset shards. One host's clock: exact on one machine.
            "first_batch_after_s": first_batch_at[0] - cfg["fit_started_at"] if first_batch_at else None,
        }
        history.append(metrics)
        if rank == 0:
            left = (tcfg["epochs"] - epoch - 1) * metrics["epoch_s"]
            # One line per epoch: what a person follows in `ray job logs -f`. A logger, not print(): Ray
            # Train's print patch would show a printed line twice (stdout and its log handler).
            log.info(
                f"[{kind}] epoch {epoch + 1}/{tcfg['epochs']}: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.2%} "
                f"{metrics['samples_per_s']:,.0f} samples/s {metrics['epoch_s']:.1f}s, ~{left:.0f}s left"
            )
            with tempfile.TemporaryDirectory() as tmp:
                meta = {**cfg["meta"], "epoch": epoch, "metrics": metrics, "history": history}
                save_checkpoint(tmp, raw_model, optimizer, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
