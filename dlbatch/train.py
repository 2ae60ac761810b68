"""Ray Train worker loop (data-parallel: DDP on GPUs, ``dlbatch.parallel`` on CPUs) and the trainer builder.

Every epoch all ranks call ``ray.train.report`` once (it is a barrier); rank 0 attaches the checkpoint.
With ``checkpoint_every_steps`` they also report every N steps inside an epoch (the ranks' shards are equal,
so they reach each such step together). A restarted worker group resumes from
``ray.train.get_checkpoint()``: after the epoch it finished or, for a mid-epoch checkpoint, at its step.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlbatch.checkpoint import load_training_state, save_checkpoint
from dlbatch.cluster import use_assigned_cpus
from dlbatch.models import build_model, fast_layout, forward_batch
from dlbatch.parallel import Adam, GradientAverager

log = logging.getLogger(__name__)

FEATURES = {"image": ["x", "y"], "text": ["tokens", "length", "y"]}
DTYPES = {"x": torch.float32, "y": torch.int64, "tokens": torch.int64, "length": torch.int64}


def shard_name(split: str, rank: int) -> str:
    """Trainer dataset name of one rank's part of a split (also a log file name: no slashes)."""
    return f"{split}-rank{rank}"


def rank_parts(shards: dict[str, Any], rank: int) -> tuple[Any, Any]:
    """This rank's training and validation parts, materialized here once per fit.

    A part arrives pickled in ``train_loop_config``, and a pickled Ray Data dataset has lost its cached
    blocks (a ``split`` part never had them), so every pass over it would start a streaming executor: two
    per epoch on every rank. ``materialize()`` only collects the blocks the driver already holds (nothing is
    read or copied), and later passes read them directly, in the same order.
    """
    return tuple(shards[shard_name(split, rank)].materialize() for split in ("train", "val"))


def _autocast(device: torch.device):
    # bf16 autocast on GPU only: on CPU it slows small convs/GRUs down.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(shard, kind: str, batch_size: int, device: torch.device):
    """Tensor batches on ``device``. On a GPU, batches are collated into pinned host memory and copied
    asynchronously. The GRU's lengths stay on the host, where ``pack_padded_sequence`` wants them: a copy
    back from the GPU would stall every step."""
    on_gpu = device.type == "cuda"
    lengths_on_host = on_gpu and "length" in FEATURES[kind]
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={k: DTYPES[k] for k in FEATURES[kind]},
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


# "auto" holds a rank's parts on its GPU when they take at most this share of the GPU's free memory; on
# CPUs, when the parts of all ranks on the host take at most this share of its available memory.
HOLD_SHARE_OF_FREE_GPU_MEMORY = 0.25
HOLD_SHARE_OF_AVAILABLE_HOST_MEMORY = 0.10


def host_available_bytes() -> int | None:
    """The host's available memory (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def hold_decision(
    mode: str | bool, nbytes: int, device: torch.device, ranks_on_host: int = 1
) -> tuple[bool, str]:
    """Whether a rank holds its training and validation parts (``nbytes`` together) as tensors on
    ``device`` for the whole fit, and why, in words for the log. ``mode``: the ``train.hold_data`` setting
    (True, False or "auto"); ``ranks_on_host``: ranks on this host, each holding its own part."""
    size = f"{nbytes / 2**20:,.0f} MiB"
    if isinstance(mode, bool):
        return mode, f"train.hold_data={str(mode).lower()} ({size})"
    if device.type == "cuda":  # "auto" (the config admits nothing else)
        free, _ = torch.cuda.mem_get_info(device)
        fits = nbytes <= HOLD_SHARE_OF_FREE_GPU_MEMORY * free
        share = f"{HOLD_SHARE_OF_FREE_GPU_MEMORY:.0%} of the {free / 2**30:,.1f} GiB free on {device}"
        return fits, f"{size} {'within' if fits else 'over'} {share}"
    available = host_available_bytes()
    if available is None:
        return False, "the host's available memory is unknown"
    fits = nbytes * ranks_on_host <= HOLD_SHARE_OF_AVAILABLE_HOST_MEMORY * available
    share = f"{HOLD_SHARE_OF_AVAILABLE_HOST_MEMORY:.0%} of the host's {available / 2**30:,.1f} GiB available"
    return fits, f"{size} x {ranks_on_host} ranks {'within' if fits else 'over'} {share}"


def part_tensors(part, kind: str, device: torch.device) -> dict[str, torch.Tensor]:
    """A rank's whole part as one tensor per feature on ``device``, converted block by block by Ray Data
    exactly as the streamed batches are (so a fit trains on the same values either way). The GRU's lengths
    stay on the host on a GPU, as in ``_batches``."""
    on_gpu = device.type == "cuda"
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES[kind]}
    for block in part.iter_torch_batches(
        batch_size=None, dtypes={k: DTYPES[k] for k in FEATURES[kind]}, device="cpu", prefetch_batches=2
    ):
        for k, v in block.items():
            chunks[k].append(v if k == "length" and on_gpu else v.to(device))
    return {k: torch.cat(v) if v else torch.empty(0, dtype=DTYPES[k]) for k, v in chunks.items()}


def _held_batches(tensors: dict[str, torch.Tensor], batch_size: int, first_step: int = 0):
    """Batches sliced from held tensors, in the part's order, from batch ``first_step`` on: the same
    batches ``_batches`` streams (the last one may be short)."""
    rows = len(next(iter(tensors.values())))
    for start in range(first_step * batch_size, rows, batch_size):
        yield {k: v[start : start + batch_size] for k, v in tensors.items()}


def _noting_first(batches, noted: list[float]):
    """Pass batches through; append the wall-clock time of the first one to ``noted``."""
    for batch in batches:
        if not noted:
            noted.append(time.time())
        yield batch


def train_epoch(
    model: nn.Module,
    optimizer,
    batches,
    kind: str,
    device: torch.device,
    first_step: int = 0,
    every: int | None = None,
    on_checkpoint: Callable[[int, float, int], None] | None = None,
    average_gradients: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """One pass over ``batches``, the epoch's batches from step ``first_step`` on. Returns (summed loss,
    samples) of the steps taken here. With ``every``, ``on_checkpoint(step, summed loss, samples)`` runs
    after each step number (counted from the epoch's start) that is a multiple of it.
    ``average_gradients`` runs between the backward pass and the optimizer step (None: a DDP model
    averages them itself).

    The loss is summed on the device and read once at the end (or at a checkpoint): a ``.item()`` per step
    would make the host wait for the GPU every step instead of queueing the next one."""
    model.train()
    total_loss, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for step, batch in enumerate(batches, start=first_step + 1):
        with _autocast(device):
            logits = forward_batch(model, kind, batch)
        loss = F.cross_entropy(logits.float(), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if average_gradients is not None:
            average_gradients()
        optimizer.step()
        n = batch["y"].shape[0]
        total_loss += loss.detach() * n
        seen += n
        if every and on_checkpoint and step % every == 0:
            on_checkpoint(step, total_loss.item(), seen)
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


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# Ray Train 2.60's controller collects each worker's reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s)
# through a queue that holds one: a worker that reports more often waits in report() (measured: 4 mid-epoch
# checkpoints in a 2.3 s epoch made it 6.4-8.6 s).
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


def _quiet_per_epoch_logs() -> None:
    """Every epoch each rank would log Ray Data's execution banners for each of its two iterators, and Ray
    Train a "Reporting training result" line with the whole metrics dict for every report (mid-epoch
    checkpoints too); rank 0's one epoch line says it all. Warnings and errors still show, but for the one below."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # A batch that lies inside one stored block can be a read-only NumPy view, and torch warns about it once
    # per worker (seen with and without ``rank_parts``). Nothing here writes into a batch, and a check that
    # wrote into every batch in place found the next pass over the part unchanged.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    try:  # Ray Train names that logger by its module's file path (a private module: skip if it moves)
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# Ray Train's helper actors that a fit here does without, each a process that imports Ray Train (~3.4 s of CPU
# on 2 cores) while the worker group starts: the dataset manager serves ``datasets=``, which this job does not
# use (each rank's part comes in the train loop's config); the placement-group cleaner is only kept where the
# driver may die while the cluster lives on (see ``cluster.placement_groups_released``).
_UNNEEDED_ON_A_PRIVATE_CLUSTER = {"DatasetsCallback", "PlacementGroupCleanerCallback"}


def trainer_class(private_cluster: bool):
    """``TorchTrainer`` without Ray Train's helper actors that this job does not need: on 2 cores they took
    ~5 s of the ~18 s from ``fit()`` to the first batch (docs/PERFORMANCE.md). The hook is Ray 2.60's
    ``_create_default_callbacks``; a Ray without it leaves the actors in place, slower but correct, and
    tests/test_pipeline.py checks which actors a fit started."""
    from ray.train.torch import TorchTrainer

    skip = _UNNEEDED_ON_A_PRIVATE_CLUSTER if private_cluster else {"DatasetsCallback"}

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:  # given datasets after all: Ray Train's dataset manager serves them
                return callbacks
            return [cb for cb in callbacks if type(cb).__name__ not in skip]

    return Trainer


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry point. ``cfg``: kind, model_args, train settings, checkpoint metadata (plain data),
    and ``shards``, each rank's materialized part of the training and validation splits by ``shard_name``."""
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
    # The same Adam either way (checkpoints move between them); see dlbatch/parallel.py for why CPUs differ.
    on_gpu = device.type == "cuda"
    optimizer = (torch.optim.Adam if on_gpu else Adam)(model.parameters(), lr=tcfg["lr"])
    start_epoch, start_step, carried, history = 0, 0, {"loss_sum": 0.0, "seen": 0}, []
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as ckpt_dir:
            meta = load_training_state(ckpt_dir, model, optimizer)
        history = meta.get("history", [])
        if meta.get("step"):  # taken inside epoch meta["epoch"], after meta["step"] of its steps
            start_epoch, start_step, carried = meta["epoch"], meta["step"], meta["partial"]
        else:
            start_epoch = meta["epoch"] + 1
        if rank == 0:
            at = f"epoch {start_epoch + 1}" + (f" after its step {start_step}" if start_step else "")
            log.info(f"[{kind}] resuming at {at}, from the last registered checkpoint")
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if on_gpu else None)
    raw_model = model.module if hasattr(model, "module") else model
    # The compiled wrapper runs the steps (it shares the parameters); checkpoints save ``raw_model``.
    step_model = torch.compile(model) if tcfg["compile"] else model
    average_gradients = None if on_gpu else GradientAverager(model)
    if rank == 0 and average_gradients is not None and average_gradients.fallback:
        log.info(f"[{kind}] gradients are averaged by all-reduce: {average_gradients.fallback}")

    def report(metrics: dict[str, Any], meta: dict[str, Any]) -> None:
        """All ranks report (a barrier); rank 0 attaches the checkpoint with ``meta``."""
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, raw_model, optimizer, {**cfg["meta"], **meta, "history": history})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    train_shard, val_shard = rank_parts(cfg["shards"], rank)
    part_bytes = train_shard.size_bytes() + val_shard.size_bytes()
    hold, why = hold_decision(tcfg["hold_data"], part_bytes, device, ctx.get_local_world_size())
    if hold:
        try:
            held = {
                split: part_tensors(part, kind, device)
                for split, part in (("train", train_shard), ("val", val_shard))
            }
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(
                f"[{kind}] train.hold_data: this rank's data ({part_bytes / 2**20:,.0f} MiB) does not fit on "
                f"{device}; set {kind}.train.hold_data=auto or false to stream it"
            ) from None
    if rank == 0:
        where = f"held on {device} for the fit" if hold else "streamed by Ray Data every epoch"
        log.info(f"[{kind}] training data {where}: {why}")

    def epoch_batches(split: str, first_step: int = 0):
        if hold:
            return _held_batches(held[split], tcfg["batch_size"], first_step)
        shard = train_shard if split == "train" else val_shard
        return islice(_batches(shard, kind, tcfg["batch_size"], device), first_step, None)

    first_batch_at: list[float] = []
    last_mid_epoch_checkpoint = {"at": None, "warned": False}
    for epoch in range(start_epoch, tcfg["epochs"]):
        t0, started_at = time.perf_counter(), time.time()
        first_step = start_step if epoch == start_epoch else 0
        before = carried if epoch == start_epoch else {"loss_sum": 0.0, "seen": 0}

        def checkpoint_mid_epoch(step: int, loss_sum: float, seen: int, epoch=epoch, before=before) -> None:
            loss_sum, seen = _all_reduce([loss_sum, seen], device)
            partial = {"loss_sum": before["loss_sum"] + loss_sum, "seen": int(before["seen"] + seen)}
            # No validation metrics: the pipeline picks its best checkpoint among the epochs' ends.
            metrics = {
                "epoch": epoch,
                "step": step,
                "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
            }
            report(metrics, {"epoch": epoch, "step": step, "partial": partial})
            if rank == 0:
                _warn_if_too_frequent(last_mid_epoch_checkpoint)

        # The shard's order is fixed (materialized once, cut once on the driver), so the steps a mid-epoch
        # checkpoint already took are the first ``first_step`` batches: skip them, do not train on them.
        with compile_errors(kind, tcfg["compile"]):  # compiling happens in the first steps of each mode
            loss_sum, seen = train_epoch(
                step_model, optimizer, _noting_first(epoch_batches("train", first_step), first_batch_at), kind,
                device, first_step, tcfg["checkpoint_every_steps"], checkpoint_mid_epoch, average_gradients,
            )  # fmt: skip
            train_s = time.perf_counter() - t0
            val_loss, correct, val_seen = eval_epoch(step_model, epoch_batches("val"), kind, device)
        loss_sum, trained_here, val_loss, correct, val_seen, sum_train_s = _all_reduce(
            [loss_sum, seen, val_loss, correct, val_seen, train_s], device
        )
        # The whole epoch's sums: a resumed epoch adds what its mid-epoch checkpoint had summed.
        loss_sum, seen = loss_sum + before["loss_sum"], trained_here + before["seen"]
        train_s = sum_train_s / ctx.get_world_size()  # mean over ranks
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_samples": int(seen),
            "val_loss": val_loss / max(val_seen, 1),
            "val_accuracy": correct / max(val_seen, 1),
            "val_rows": int(val_seen),
            "samples_per_s": trained_here / max(train_s, 1e-9),  # the steps this worker group took
            "epoch_s": time.perf_counter() - t0,
            # Wall clock of the training pass (rank 0's start, mean length): lines up with other samplers,
            # e.g. the benchmark's GPU utilization.
            "train_started_at": started_at,
            "train_s": train_s,
            # The checkpoint this worker group started from: its epoch, and for a mid-epoch one the steps
            # of that epoch it had taken (None: the checkpoint ended its epoch).
            "resumed_from_epoch": (start_epoch if start_step else start_epoch - 1) if resume else None,
            "resumed_at_step": start_step or None,
            "data_held": hold,  # sliced from tensors held on the device (train.hold_data), not streamed
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
        report(metrics, {"epoch": epoch, "metrics": metrics})
