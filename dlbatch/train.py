"""Ray Train worker loop: DDP through ``ray.train.torch.prepare_model``, the recipe of ``recipe.py`` (AdamW,
a learning rate stepped every batch, image augmentation), and the data through Ray Train's own dataset API
(``get_dataset_shard``), on CPUs and GPUs alike.

Every epoch all ranks call ``ray.train.report`` once (it is a barrier); rank 0 attaches the checkpoint.
With ``checkpoint_every_steps`` they also report every N steps inside an epoch (Ray Train splits the
training set into equal shards, so every rank reaches each such step). A restarted worker group resumes
from ``ray.train.get_checkpoint()``: after the epoch it finished or, for a mid-epoch checkpoint, with the
steps that epoch had left (see ``resume_point``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlbatch.checkpoint import load_training_state, save_checkpoint
from dlbatch.cluster import WithoutMessage, use_assigned_cpus
from dlbatch.config import AugmentConfig, TrainConfig
from dlbatch.models import build_model, fast_layout, forward_batch
from dlbatch.recipe import Schedule, augmentation, for_world, optimizer_for, resized_step, scheduler_for

log = logging.getLogger(__name__)

FEATURES = {"image": ["x", "y"], "text": ["tokens", "length", "y"]}
DTYPES = {"x": torch.uint8, "y": torch.int64, "tokens": torch.int64, "length": torch.int64}
# Rows mixed by each worker's local shuffle buffer with ``train.shuffle=files`` (a few batches' worth).
LOCAL_SHUFFLE_ROWS = 4096


def epoch_seed(seed: int, run_id: str, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed for one (run, epoch, rank): reruns of a run draw the same numbers."""
    return zlib.crc32(f"{seed}/{run_id}/{epoch}/{rank}".encode())


def _autocast(device: torch.device):
    # bf16 autocast on GPU only: on CPU it slows small convs/GRUs down.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_batches(shard, kind: str, batch_size: int, device: torch.device, shuffle_seed: int | None = None):
    """One pass over a dataset shard as tensor batches on ``device``; with ``shuffle_seed``, rows mixed in
    a local buffer first. On a GPU, batches are collated into pinned host memory and copied
    asynchronously; the GRU's lengths stay on the host, where ``pack_padded_sequence`` wants them."""
    on_gpu = device.type == "cuda"
    lengths_on_host = on_gpu and "length" in FEATURES[kind]
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={k: DTYPES[k] for k in FEATURES[kind]},
        device="cpu" if lengths_on_host else device,
        pin_memory=on_gpu,
        prefetch_batches=2,
        local_shuffle_buffer_size=LOCAL_SHUFFLE_ROWS if shuffle_seed is not None else None,
        local_shuffle_seed=shuffle_seed,
    )
    if not lengths_on_host:
        return batches
    return (
        {k: v if k == "length" else v.to(device, non_blocking=True) for k, v in batch.items()}
        for batch in batches
    )


@dataclass
class EpochSums:
    loss_sum: float = 0.0
    seen: int = 0
    first_batch_at: float | None = None  # wall clock of the pass's first batch (time to first step)


@dataclass
class Optim:
    """A rank's optimizer, its per-step learning-rate scheduler, and the training-only augmentation of its
    input batches (None: none)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: nn.Module | None = None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def _augmented(batch: dict[str, torch.Tensor], augment: nn.Module | None) -> dict[str, torch.Tensor]:
    if augment is None:
        return batch
    with torch.no_grad():
        return {**batch, "x": augment(batch["x"].float().mul_(1 / 255))}


def train_epoch(
    model: nn.Module,
    optim: Optim,
    batches,
    kind: str,
    device: torch.device,
    first_step: int = 0,
    every: int | None = None,
    on_checkpoint: Callable[[int, float, int], None] | None = None,
) -> EpochSums:
    """One pass over ``batches``, numbering steps from ``first_step + 1``. With ``every``,
    ``on_checkpoint(step, summed loss, samples)`` runs after each step number that is a multiple of it.

    The loss is summed on the device and read once at the end (or at a checkpoint): a ``.item()`` per step
    would make the host wait for the GPU every step instead of queueing the next one."""
    model.train()
    sums = EpochSums()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    for step, batch in enumerate(batches, start=first_step + 1):
        if sums.first_batch_at is None:
            sums.first_batch_at = time.time()
        batch = _augmented(batch, optim.augment)
        with _autocast(device):
            logits = forward_batch(model, kind, batch)
        loss = F.cross_entropy(logits.float(), batch["y"])
        optim.step(loss)
        n = batch["y"].shape[0]
        total_loss += loss.detach() * n
        sums.seen += n
        if every and on_checkpoint and step % every == 0:
            on_checkpoint(step, total_loss.item(), sums.seen)
    sums.loss_sum = total_loss.item()
    return sums


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


@contextlib.contextmanager
def compile_errors(kind: str, compiled: bool = True):
    """With ``compiled``, a failure of torch.compile (no C++ compiler for CPU kernels, an op it cannot
    trace) becomes one line naming the setting that asked for it, not a compiler's trace from a worker."""
    try:
        yield
    except Exception as err:
        # Only a compiled fit looks at torch._dynamo (importing it takes a while).
        if not (compiled and isinstance(err, torch._dynamo.exc.TorchDynamoException)):
            raise
        lines = str(err).strip().splitlines()
        raise RuntimeError(
            f"[{kind}] train.compile: torch.compile failed ({lines[0] if lines else type(err).__name__}); "
            f"set {kind}.train.compile=false to train without it"
        ) from None


def _finite_weights(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# Ray Train's controller collects each worker's reports every couple of seconds through a queue that holds
# one: a worker that reports more often than that waits in report().
MIN_CHECKPOINT_INTERVAL_S = 5.0


def _warn_if_too_frequent(state: dict[str, Any]) -> None:
    """Warn once when two mid-epoch checkpoints come closer than MIN_CHECKPOINT_INTERVAL_S."""
    now = time.perf_counter()
    interval = now - state["at"] if state["at"] is not None else None
    state["at"] = now
    if interval is not None and interval < MIN_CHECKPOINT_INTERVAL_S and not state["warned"]:
        state["warned"] = True
        log.warning(
            f"mid-epoch checkpoints come every {interval:.1f}s; Ray Train takes a report about every 2s, so "
            f"training waits on them: raise train.checkpoint_every_steps (>= {MIN_CHECKPOINT_INTERVAL_S:.0f}s apart)"
        )


@dataclass
class ResumePoint:
    """Where a fit starts: the epoch, the steps of it already taken, and that epoch's sums so far."""

    epoch: int = 0
    step: int = 0
    carried: dict[str, float] = field(default_factory=lambda: {"loss_sum": 0.0, "seen": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False


def _resize(optim: Optim, schedule: Schedule, saved_world: int, world: int) -> None:
    """A schedule checkpointed at another world size goes on from the same share of the fit, at this
    size's rate: its step count is rescaled and the groups' rates recomputed from this size's peak."""
    sched = optim.scheduler
    sched.last_epoch = resized_step(sched.last_epoch, saved_world, world)
    sched.base_lrs = [schedule.peak_lr] * len(optim.optimizer.param_groups)
    for group, factor in zip(optim.optimizer.param_groups, sched.lr_lambdas, strict=True):
        group["initial_lr"] = schedule.peak_lr
        group["lr"] = schedule.peak_lr * factor(sched.last_epoch)


def resume_point(model: nn.Module, optim: Optim, schedule: Schedule | None = None) -> ResumePoint:
    """Restore weights, optimizer and learning-rate schedule from Ray Train's latest checkpoint, if any. An
    end-of-epoch checkpoint resumes at the next epoch; a mid-epoch one (taken after ``step`` steps) resumes
    that epoch and trains only the steps it had left, on a freshly shuffled pass, so every epoch takes the
    same number of steps, and the schedule goes on from the step the checkpoint took. A checkpoint of
    another world size (elastic training) counts its steps as the steps that train as many samples now."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return ResumePoint()
    with ckpt.as_directory() as ckpt_dir:
        meta = load_training_state(ckpt_dir, model, optim.optimizer, optim.scheduler)
    history = meta.get("history", [])
    world = ray.train.get_context().get_world_size()
    saved_world = meta.get("world_size", world)
    if saved_world != world and schedule is not None:
        _resize(optim, schedule, saved_world, world)
    if meta.get("step"):
        step = resized_step(meta["step"], saved_world, world)
        return ResumePoint(meta["epoch"], step, meta["partial"], history, True)
    return ResumePoint(meta["epoch"] + 1, 0, ResumePoint().carried, history, True)


def _quiet_worker_logs() -> None:
    """Ray Data's per-iterator execution banners would repeat every epoch on every rank, and Ray Train
    echoes every report; rank 0's epoch line says it all. A batch inside one stored block can be a
    read-only NumPy view, and torch warns once per worker about it: nothing here writes into a batch."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        # Ray Train's line per report and rank, with the whole metrics dict: the epoch line says it.
        handler.addFilter(WithoutMessage("Reporting training result"))
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass(frozen=True)
class WorkerConfig:
    """What crosses into every Ray Train worker: typed on both sides of the boundary."""

    kind: str
    model_args: dict[str, Any]  # as saved in checkpoints (models.py build_model)
    train: TrainConfig
    run_id: str
    meta: dict[str, Any]  # checkpoint metadata: kind, label map, tokenizer, task config
    fit_started_at: float  # the driver's wall clock at fit(), for the time to the first batch
    schedule: Schedule  # the learning-rate plan, from the training split's rows (recipe.plan_schedule)
    augment: AugmentConfig | None = None  # None: training batches are not augmented
    weights: str | None = None  # a backbone's pretrained weights, loaded unless resuming from a checkpoint


class Worker:
    """One rank's fit: its model (``model`` unwrapped, for checkpoints and validation; ``step_model`` DDP
    and maybe compiled, for the steps), its optimizer and where it started. Every rank reports each epoch
    (and each mid-epoch checkpoint): a barrier; rank 0 attaches the checkpoint and writes the epoch line."""

    def __init__(self, config: WorkerConfig, model: nn.Module, optim: Optim, start: ResumePoint):
        import ray.train
        import ray.train.torch

        self.config, self.model, self.optim, self.start = config, model, optim, start
        self.rank = ray.train.get_context().get_world_rank()
        self.world = ray.train.get_context().get_world_size()
        self.device = ray.train.torch.get_device()
        self.history = start.history
        self.last_mid_epoch = {"at": None, "warned": False}
        ddp_model = ray.train.torch.prepare_model(model)  # DDP once there are several workers
        # The compiled wrapper runs the steps (it shares the parameters).
        self.step_model = torch.compile(ddp_model) if config.train.compile else ddp_model

    def run_epoch(self, epoch: int, shards: dict[str, Any]) -> EpochPass:
        """Train on this rank's shard (a resumed epoch only the steps its checkpoint had not taken), then
        validate this rank's part of the validation split with the unwrapped model (no collective in its
        forward; every rank holds the same weights): ``epoch_metrics`` sums the parts."""
        config, device, start = self.config, self.device, self.start
        tcfg, kind = config.train, config.kind
        t0, started_at = time.perf_counter(), time.time()
        first_step = start.step if epoch == start.epoch else 0
        before = start.carried if epoch == start.epoch else {"loss_sum": 0.0, "seen": 0}
        seed = epoch_seed(tcfg.seed, config.run_id, epoch, self.rank) if tcfg.shuffle == "files" else None
        # Each rank's crops and flips differ, and a rerun of the epoch draws the same ones.
        torch.manual_seed(epoch_seed(tcfg.seed, config.run_id, epoch, self.rank))
        # Every rank reads its shard to the end (a rank that stopped would stall the others' split).
        batches = islice(
            epoch_batches(shards["train"], kind, tcfg.batch_size, device, seed), first_step, None
        )
        with compile_errors(kind, tcfg.compile):  # compiling happens in the first steps of each mode
            sums = train_epoch(self.step_model, self.optim, batches, kind, device, first_step,
                               tcfg.checkpoint_every_steps, self.mid_epoch(epoch, before))  # fmt: skip
            train_s = time.perf_counter() - t0
            val = eval_epoch(
                self.model, epoch_batches(shards["val"], kind, tcfg.batch_size, device), kind, device
            )
        return EpochPass(epoch, sums, before, val, started_at, t0, train_s, self.optim.lr())

    def report(self, metrics: dict[str, Any], meta: dict[str, Any]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                tmp,
                self.model,
                self.optim.optimizer,
                {**self.config.meta, **meta, "history": self.history, "world_size": self.world},
                self.optim.scheduler,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def mid_epoch(self, epoch: int, before: dict[str, float]):
        """``train_epoch``'s checkpoint callback for ``epoch`` (``before``: sums the epoch had carried)."""

        def checkpoint(step: int, loss_sum: float, seen: int) -> None:
            loss_sum, seen = _sum_over_ranks([loss_sum, seen], self.device)
            partial = {"loss_sum": before["loss_sum"] + loss_sum, "seen": int(before["seen"] + seen)}
            # No validation metrics: the fit stage picks its best checkpoint among the epochs' ends.
            metrics = {
                "epoch": epoch,
                "step": step,
                "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
            }
            if not math.isfinite(metrics["train_loss"]):
                return  # never checkpoint a diverged model; the epoch's end stops the fit
            self.report(metrics, {"epoch": epoch, "step": step, "partial": partial})
            if self.rank == 0:
                _warn_if_too_frequent(self.last_mid_epoch)

        return checkpoint

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        epochs = self.config.train.epochs
        if self.rank == 0:
            left = (epochs - metrics["epoch"] - 1) * metrics["epoch_s"]
            # One line per epoch: what a person follows in `ray job logs -f`. A logger, not print(): Ray
            # Train's print patch would show a printed line twice (stdout and its log handler).
            log.info(
                f"[{self.config.kind}] epoch {metrics['epoch'] + 1}/{epochs}: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.2%} "
                f"{metrics['samples_per_s']:,.0f} samples/s {metrics['epoch_s']:.1f}s, ~{left:.0f}s left"
            )
        self.report(metrics, {"epoch": metrics["epoch"], "metrics": metrics})


@dataclass(frozen=True)
class EpochPass:
    """What one epoch's training pass and validation measured on this rank."""

    epoch: int
    sums: EpochSums
    before: dict[str, float]  # what a mid-epoch checkpoint had summed of this epoch before a resume
    val: tuple[float, int, int]  # summed loss, correct, rows of this rank's part of the validation split
    started_at: float
    t0: float
    train_s: float
    lr: float  # the learning rate after the pass's last step


def epoch_metrics(done: EpochPass, start: ResumePoint, config: WorkerConfig, device: torch.device) -> dict:
    """The epoch's metrics over every rank: a resumed epoch adds what its mid-epoch checkpoint had summed."""
    loss_sum, trained_here, sum_train_s, val_loss, correct, val_seen, val_ranks = _sum_over_ranks(
        [done.sums.loss_sum, done.sums.seen, done.train_s, *done.val, float(done.val[2] > 0)], device
    )
    loss_sum, seen = loss_sum + done.before["loss_sum"], trained_here + done.before["seen"]
    train_s = sum_train_s / (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
    first = done.sums.first_batch_at
    return {
        "epoch": done.epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_samples": int(seen),
        "val_loss": val_loss / max(val_seen, 1),
        "val_accuracy": correct / max(val_seen, 1),
        "val_rows": int(round(val_seen)),
        "val_ranks": int(val_ranks),  # ranks that validated a part of the split
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "lr": done.lr,
        "samples_per_s": trained_here / max(train_s, 1e-9),  # the steps this worker group took
        "epoch_s": time.perf_counter() - done.t0,
        # Wall clock of the training pass (rank 0's start, mean length): lines up with other samplers,
        # e.g. the benchmark's GPU utilization.
        "train_started_at": done.started_at,
        "train_s": train_s,
        # The checkpoint this worker group started from: its epoch, and for a mid-epoch one the steps
        # of that epoch it had taken (None: the checkpoint ended its epoch).
        "resumed_from_epoch": (start.epoch if start.step else start.epoch - 1) if start.resumed else None,
        "resumed_at_step": start.step or None,
        # Seconds from the driver's fit() to this pass's first batch (one host's clock).
        "first_batch_after_s": first - config.fit_started_at if first else None,
    }


def diverged(metrics: dict[str, Any], model: nn.Module, device: torch.device) -> bool:
    """Decided together (rank 0 checks the weights, which every rank holds alike): a NaN or infinite loss
    ends the fit on every rank, with no checkpoint, so nothing non-finite is ever published."""
    import ray.train

    rank0 = ray.train.get_context().get_world_rank() == 0
    finite = math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    finite = finite and (not rank0 or _finite_weights(model))
    return bool(_sum_over_ranks([0.0 if finite else 1.0], device)[0])


def train_loop_per_worker(config: WorkerConfig) -> dict[str, Any] | None:
    """Ray Train entry point (bound to its config with functools.partial). The datasets come from the
    trainer: ``train`` split into equal shards, ``val`` into parts that together hold every row."""
    import ray.train
    import ray.train.torch

    use_assigned_cpus()
    _quiet_worker_logs()
    torch.manual_seed(
        config.train.seed
    )  # DDP broadcasts rank 0's weights anyway; the same seed keeps it moot
    device = ray.train.torch.get_device()
    model = build_model(config.kind, config.model_args)
    if config.weights:  # a resumed fit then loads its checkpoint over them
        from dlbatch.backbone import load_pretrained

        load_pretrained(model, config.weights)
    model = fast_layout(model.to(device))
    # Planned for the most workers; an elastic fit runs at the size it got (recipe.for_world).
    schedule = for_world(config.schedule, config.train, ray.train.get_context().get_world_size())
    optimizer = optimizer_for(model, schedule)
    augment = config.augment and augmentation(
        config.augment, config.model_args["height"], config.model_args["width"]
    ).to(device)
    optim = Optim(optimizer, scheduler_for(optimizer, schedule), augment or None)
    start = resume_point(model, optim, schedule)
    if start.resumed and ray.train.get_context().get_world_rank() == 0:
        at = f"epoch {start.epoch + 1}" + (
            f" with the steps after its step {start.step}" if start.step else ""
        )
        log.info(f"[{config.kind}] resuming at {at}, from the last registered checkpoint")
    worker = Worker(config, model, optim, start)
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    for epoch in range(start.epoch, config.train.epochs):
        done = worker.run_epoch(epoch, shards)
        metrics = epoch_metrics(done, start, config, device)
        if diverged(metrics, model, device):
            return {"diverged": metrics}  # rank 0's return value reaches the driver (Result.return_value)
        worker.end_epoch(metrics)
    return None
