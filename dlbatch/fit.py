"""The fit stage: Ray Train's TorchTrainer over the ingest's datasets, and the best epoch's checkpoint
published as the night's model (``runs/<date>/<task>/model``)."""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from concurrent.futures import Future
from typing import Any

import pyarrow.fs as pafs

from dlbatch.checkpoint import load_meta
from dlbatch.cluster import DataNodes, check_cpus_left_for_data, route_data_work
from dlbatch.context import RunContext
from dlbatch.data import SplitInfo, resolve_path
from dlbatch.errors import TrainingError
from dlbatch.ingest import checkpoint_meta, training_data
from dlbatch.night import Fit, Learned, SplitCheck, rows_line
from dlbatch.recipe import augments, plan_schedule
from dlbatch.store import (
    SUCCESS,
    is_published,
    mark_published,
    move_into_place,
    read_json,
    remove_if_exists,
    staging_dir,
)
from dlbatch.train import WorkerConfig, train_loop_per_worker

log = logging.getLogger("dlbatch")


def _trained_earlier(ctx: RunContext) -> Fit:
    """The model an earlier attempt of this run date published, with what its marker kept of the fit."""
    paths = ctx.paths
    log.info(
        "%s: model for %s already trained at %s; not retrained", ctx.task, paths.run_date, paths.uri("model")
    )
    marker = read_json(paths.fs, f"{paths.path('model')}/{SUCCESS}") or {}
    splits = {s: SplitCheck(None, p) for s, p in marker.get("profile", {}).items()}
    return Fit(paths.uri("model"), marker.get("history", []), splits)


def sharded_validation(data_selector: dict[str, str] | None = None, val_rows: int = 0):
    """Ray Train's DataConfig, with the validation split dealt to the ranks as well: the training split in
    equal shards (DDP ranks take the same number of steps), the validation split in parts that together
    hold every row once (``equal=False``: an equal split would drop up to a row per rank, and validation
    has no collective step that needs equal parts), in blocks of about a quarter of a rank's share, which
    the ranks take as they go. Every rank validates its part; the sums are added.
    With ``data_selector``, the datasets' Ray Data work runs on the data nodes (``cluster.data_nodes``)."""
    import copy

    import ray.train
    from ray.data import DataContext, ExecutionOptions

    # Built here, not from DataConfig.default_ingest_options(), which passes Ray Data's deprecated
    # exclude_resources (a warning in every job's log).
    limits = DataContext.get_current().execution_options.resource_limits
    options = ExecutionOptions(resource_limits=limits, label_selector=data_selector)

    class ShardedValidation(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {name: ds for name, ds in datasets.items() if name != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                per_block = max(math.ceil(val_rows / (4 * world_size)), 1)
                val = datasets["val"].repartition(target_num_rows_per_block=per_block)
                val.context.execution_options = copy.deepcopy(options)
                if val.name is None:
                    val.set_name("val")
                for rank, part in enumerate(val.streaming_split(world_size, equal=False)):
                    output[rank]["val"] = part
            return output

    return ShardedValidation(datasets_to_split=["train"], execution_options=options)


def _trainer(
    ctx: RunContext, datasets: dict[str, Any], worker: WorkerConfig, nodes: DataNodes, val_rows: int
):
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = ctx.config.train
    return TorchTrainer(
        functools.partial(train_loop_per_worker, worker),
        datasets=datasets,
        dataset_config=sharded_validation(nodes.data, val_rows),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers,  # (min, max): Ray Train's elastic training
            elastic_resize_monitor_interval_s=tcfg.elastic_resize_interval_s,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})},
            placement_strategy=tcfg.placement_strategy,
            label_selector=nodes.elsewhere,  # training workers keep off the data nodes
        ),
        run_config=ray.train.RunConfig(
            name=ctx.run_id,
            storage_path=ctx.paths.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            # Every checkpoint is kept, in the order reported; the best is picked after the fit. A score
            # attribute would also rank mid-epoch checkpoints, which have no validation score.
            checkpoint_config=ray.train.CheckpointConfig(),
        ),
    )


def _best_epoch_checkpoint(trained, task: str):
    """The validated checkpoint with the best val accuracy: one taken at the end of an epoch, never a
    mid-epoch one (``checkpoint_every_steps``), which has no validation."""
    epochs = [(ckpt, m) for ckpt, m in trained.best_checkpoints or [] if m.get("step") is None]
    if not epochs:
        raise RuntimeError(f"{task}: training finished without an end-of-epoch checkpoint")
    # Ties go to the earlier epoch, as Ray Train's get_best_checkpoint did.
    return max(epochs, key=lambda entry: (entry[1]["val_accuracy"], -entry[1]["epoch"]))[0]


def _history(checkpoint) -> list[dict[str, Any]]:
    with checkpoint.as_directory() as ckpt_dir:
        return load_meta(ckpt_dir).get("history", [])


def _publish_best(ctx: RunContext, trained) -> tuple[list[dict[str, Any]], int | None, int | None]:
    """Copy the best epoch's checkpoint to the run's model directory; returns the whole run's per-epoch
    history (the latest checkpoint's covers every epoch), the best epoch and the final one."""
    best = _best_epoch_checkpoint(trained, ctx.task)
    paths = ctx.paths
    staged = staging_dir(paths, "model")
    paths.fs.create_dir(staged, recursive=True)
    pafs.copy_files(best.path, staged, source_filesystem=best.filesystem, destination_filesystem=paths.fs)
    move_into_place(paths.fs, staged, paths.path("model"))
    best_history = _history(best)
    history = _history(trained.checkpoint) if trained.checkpoint is not None else best_history
    final = trained.metrics or (best_history[-1] if best_history else {})
    return history, best_history[-1]["epoch"] if best_history else None, final.get("epoch")


def _worker_config(ctx: RunContext, learned: Learned, train_rows: int) -> WorkerConfig:
    """What every rank gets: the model, the recipe planned for this split's size, the checkpoint metadata."""
    task_cfg = ctx.config
    augment, weights, freeze = None, None, 0
    if ctx.task == "image":
        if augments(task_cfg.augment, task_cfg.image.channels):
            augment = task_cfg.augment
        weights, freeze = task_cfg.model.weights, task_cfg.model.freeze_epochs
        if weights:
            from dlbatch.backbone import check_weights

            check_weights(learned.model_args, weights)  # one line now, not from every worker
    schedule = plan_schedule(task_cfg.train, train_rows, freeze)
    log.info(
        "%s: AdamW at peak lr %.3g (lr %g for a global batch of %d, %s-scaled to %d), %d steps, %d of "
        "warm-up, %s decay%s%s", ctx.task, schedule.peak_lr, task_cfg.train.lr, task_cfg.train.lr_batch,
        task_cfg.train.lr_scaling, task_cfg.train.max_workers * task_cfg.train.batch_size,
        schedule.total_steps, schedule.warmup_steps, schedule.decay,
        "; crops and flips the training images" if augment else "",
        f"; from {weights}, its layers frozen for {schedule.freeze_steps} steps" if weights else "",
    )  # fmt: skip
    return WorkerConfig(
        ctx.task, learned.model_args, task_cfg.train, ctx.run_id, checkpoint_meta(ctx, learned),
        time.time(), schedule, augment, weights,
    )  # fmt: skip


def fit_model(ctx: RunContext, splits: dict[str, SplitInfo], learned: Learned) -> Fit:
    """Fit with Ray Train; publish the best checkpoint (by val accuracy) as the run's model."""
    paths, task, tcfg = ctx.paths, ctx.task, ctx.config.train
    if is_published(paths.fs, paths.path("model")):
        return _trained_earlier(ctx)
    check_cpus_left_for_data(task, tcfg.max_workers, tcfg.cpus_per_worker)
    nodes = route_data_work(ctx.job, task)  # before the datasets are made: they keep the routing
    t0 = time.perf_counter()
    data = training_data(ctx, splits, learned)
    durations = {"preprocess": time.perf_counter() - t0}
    if data.materialized:  # a streamed split is counted as it trains
        log.info("%s: preprocessed %s in %.1fs", task, rows_line(data.checks), durations["preprocess"])
    t0 = time.perf_counter()
    worker = _worker_config(ctx, learned, splits["train"].num_rows)
    try:
        trained = _trainer(ctx, data.datasets, worker, nodes, splits["val"].num_rows).fit()
    finally:  # a streamed split's rows are routed and counted before anything is published
        checks = {s: c.result() if isinstance(c, Future) else c for s, c in data.checks.items()}
    durations["train"] = time.perf_counter() - t0
    last = (trained.return_value or {}).get("diverged")
    if last:
        raise TrainingError(
            f"{task}: training diverged in epoch {last['epoch'] + 1}/{tcfg.epochs} (train loss "
            f"{last['train_loss']:.4g}, val loss {last['val_loss']:.4g}); nothing published; lower "
            f"{task}.train.lr (now {tcfg.lr:g}) and rerun with force=true"
        )
    history, best_epoch, final_epoch = _publish_best(ctx, trained)
    if history and history[0].get("first_batch_after_s") is not None:
        # Ray Train's fixed cost: fit() to the first training batch (the controller, the worker group, data).
        durations["train_first_batch"] = history[0]["first_batch_after_s"]
    # The marker carries the whole run's per-epoch history (the best checkpoint's own stops at its epoch).
    mark_published(paths.fs, paths.path("model"), {
        "best_epoch": best_epoch, "history": history,
        "profile": {s: c.profile for s, c in checks.items() if c.profile is not None},
    })  # fmt: skip
    training = {"materialized": data.materialized, "why": data.why, "shuffle": tcfg.shuffle}
    fit = Fit(paths.uri("model"), history, checks, training, durations, final_epoch)
    best = max(history, key=lambda h: (h["val_accuracy"], -h["epoch"]))
    log.info("%s: trained %d epochs in %.1fs (%s); best val accuracy %.2f%% (epoch %d), published",
             task, len(history), durations["train"], rows_line(checks), 100 * best["val_accuracy"],
             best["epoch"] + 1)  # fmt: skip
    return fit


def prune_checkpoints(ctx: RunContext) -> list[str]:
    """Delete the Ray Train checkpoints of this task's run dates older than the newest
    ``keep_checkpoint_runs``, each only once its model is published: the model (and the model store)
    holds what a finished run needs, and a run that never published may still be resumed."""
    paths, keep = ctx.paths, ctx.job.keep_checkpoint_runs
    fs, root = resolve_path(paths.storage_path)
    prefix = f"{paths.task}-"
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dates = sorted(
        i.base_name.removeprefix(prefix)
        for i in entries
        if i.type == pafs.FileType.Directory
        and re.fullmatch(rf"{prefix}\d{{4}}-\d{{2}}-\d{{2}}", i.base_name)
    )
    doomed = []
    for date in dates[:-keep]:
        if date != paths.run_date and is_published(paths.fs, paths.on(date).path("model")):
            remove_if_exists(fs, f"{root}/{prefix}{date}")
            doomed.append(f"{prefix}{date}")
    if doomed:
        log.info("%s: deleted the Ray Train checkpoints of %s (keep_checkpoint_runs=%d)", paths.task,
                 ", ".join(doomed), keep)  # fmt: skip
    return doomed
