"""The job's stages for one task: check data, train, evaluate on test, predict on score data.

Each stage is a function with explicit arguments, so jobs stay thin and tests call the real thing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dlbatch.cluster import check_cpus_left_for_data
from dlbatch.config import JobConfig, Task
from dlbatch.data import (
    SplitInfo,
    build_label_names,
    build_tokenizer,
    count_values,
    inspect_split,
    label_variants,
    read_split,
    resolve_path,
    split_columns,
    value_counts,
)
from dlbatch.demo import write_demo_data
from dlbatch.errors import DataError, TrainingError
from dlbatch.models import model_args_for
from dlbatch.predict import PRED_COLUMNS, predict_dataset, preprocess_in_tasks, preprocess_spec, use_actors
from dlbatch.preprocess import preprocess_for_training
from dlbatch.profile import PROFILE_COLUMNS, finish, merge, partial
from dlbatch.progress import heartbeat
from dlbatch.quality import describe as describe_quality
from dlbatch.quality import quality_floor
from dlbatch.store import (
    PART_DONE,
    SUCCESS,
    RunPaths,
    file_fingerprints,
    finished_parts,
    is_published,
    mark_published,
    move_into_place,
    part_key,
    plan_parts,
    publish_split,
    read_json,
    remove_if_exists,
    staged_dataset,
    staging_dir,
    tree_fingerprint,
    write_json,
)
from dlbatch.tokenizer import vocab_len as tokenizer_vocab_len
from dlbatch.train import FEATURES, train_loop_per_worker

log = logging.getLogger("dlbatch")
REJECT_COLUMNS = ["source", "reject_reason"]


@dataclass
class TaskData:
    """The checked splits of one task plus what training learned from them."""

    splits: dict[str, SplitInfo]
    meta: dict[str, Any]  # kind, label map, tokenizer, model args, config: saved with every checkpoint


@dataclass
class Counts:
    read: int = 0
    used: int = 0
    rejected: int = 0

    def check(self, what: str) -> None:
        # Conservation: every row read is either used or rejected; anything else is a bug, not bad data.
        if self.read != self.used + self.rejected:
            raise RuntimeError(
                f"{what}: {self.read} rows read != {self.used} used + {self.rejected} rejected"
            )


@dataclass
class TaskResult:
    task: str
    run_id: str
    rows: dict[str, Counts] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, dict[str, Any]] = field(default_factory=dict)  # per split (dlbatch/profile.py)
    drift: dict[str, Any] | None = None


def data_paths(cfg: JobConfig, task: Task) -> dict[str, str | None]:
    """Configured split paths; with none configured, the demo data (generated once under output_root)."""
    data = cfg.task(task).data
    paths = {"train": data.train, "val": data.val, "test": data.test, "score": data.score}
    if any(paths.values()):
        return paths
    from dlbatch.store import resolve_path

    fs, root = resolve_path(cfg.output_root)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise DataError(
            f"{cfg.output_root}: demo data is only generated on local disk; set {task}.data.* paths"
        )
    log.info("%s: no data paths configured, using the demo data", task)
    return write_demo_data(f"{root}/demo-data", task, cfg.demo_rows, seed=0)


def inspect_task(cfg: JobConfig, task: Task, splits: tuple[str, ...]) -> dict[str, SplitInfo]:
    """Fail fast on bad datasets from Parquet footers alone (no Ray needed, nothing started yet)."""
    task_cfg = cfg.task(task).model_dump()
    paths = data_paths(cfg, task)
    infos: dict[str, SplitInfo] = {}
    for split in splits:
        if not paths.get(split):
            raise DataError(f"{task}.data.{split}: no path configured")
        infos[split] = inspect_split(split, paths[split], task_cfg, task, needs_label=split != "score")
    return infos


# What a run learned from its training split, kept in its run directory (``runs/<date>/<task>/``).
LEARNED = "learned.json"


def learn_from_train(
    cfg: JobConfig, task: Task, infos: dict[str, SplitInfo], paths: RunPaths | None = None
) -> TaskData:
    """Label map and (text) tokenizer from the training split, with Ray Data; saved with every checkpoint.

    With ``paths``, the first attempt of a run date saves what it learned there and a later one (a retry
    that resumes the fit from its checkpoints) reuses it: the tokenizer's trainer is not deterministic, and
    a resumed model must keep the token ids it was trained with. ``force`` deletes it with the run."""
    task_cfg = cfg.task(task).model_dump()
    meta: dict[str, Any] = {"kind": task, "config": task_cfg}
    if "train" not in infos:
        return TaskData(splits=infos, meta=meta)
    saved = read_json(paths.fs, paths.path(LEARNED)) if paths is not None else None
    if saved is not None:
        log.info(
            "%s: label map%s of this run's first attempt reused", task, " and tokenizer" * (task == "text")
        )
        meta.update(saved)
        return TaskData(splits=infos, meta=meta)
    learned: dict[str, Any] = {"label_type": infos["train"].label_type}
    learned["label_names"] = build_label_names(infos["train"], task_cfg)
    if learned["label_type"] == "string":
        learned["label_variants"] = label_variants(learned["label_names"])
    for variants in learned.get("label_variants", []):
        log.warning("%s: labels %s differ only by case or surrounding spaces; they are kept as %d classes",
                    task, ", ".join(repr(v) for v in variants), len(variants))  # fmt: skip
    vocab_len = None
    if task == "text":
        with heartbeat(f"{task}: training the tokenizer", cfg.progress_every_s):
            tokenizer = build_tokenizer(infos["train"], task_cfg, cfg.task(task).train.seed)
        learned["tokenizer"], learned["max_length"] = tokenizer, task_cfg["text"]["max_length"]
        vocab_len = tokenizer_vocab_len(tokenizer)
    learned["model_args"] = model_args_for(task, len(learned["label_names"]), task_cfg, vocab_len)
    if paths is not None:
        write_json(paths.fs, paths.path(LEARNED), learned)
    meta.update(learned)
    return TaskData(splits=infos, meta=meta)


def check_task_data(cfg: JobConfig, task: Task, splits: tuple[str, ...]) -> TaskData:
    return learn_from_train(cfg, task, inspect_task(cfg, task, splits))


def _write_rejects(ds, paths: RunPaths, split: str, id_column: str) -> int:
    """Publish the split's rejected rows (id, source, reason); returns how many there were."""
    import pyarrow.dataset as pads
    from ray.data.expressions import col

    staged = staging_dir(paths, f"rejects-{split}")
    ds.filter(expr=col("reject_reason").is_not_null()).select_columns(["id", *REJECT_COLUMNS]).rename_columns(
        {"id": id_column}
    ).write_parquet(staged, filesystem=paths.fs)
    paths.fs.create_dir(staged, recursive=True)  # no rejects written: publish an empty directory
    written = pads.dataset(staged, filesystem=paths.fs, format="parquet").count_rows()
    move_into_place(paths.fs, staged, paths.path("rejects", split))
    return written


def _rejects_and_sums(
    batch: pa.Table, kind: str, label_column: str, label_names: list[str], id_column: str
) -> pa.Table:
    """``map_batches``: a batch's rejected rows (id, source, reason) and one row more that carries the
    batch's profile sums (JSON), so one pass over a split routes its rejects and profiles it."""
    rejected = batch.filter(pc.is_valid(batch.column("reject_reason")))
    sums = json.dumps(partial(batch, kind, label_column, label_names))

    def column(name: str, type_: pa.DataType) -> pa.Array:
        values = rejected.column(name).combine_chunks().cast(type_)
        return pa.concat_arrays([values, pa.nulls(1, type_)])

    ids = batch.column(id_column).type
    return pa.table({
        "id": column(id_column, ids), "source": column("source", pa.string()),
        "reject_reason": column("reject_reason", pa.string()),
        "profile_sums": pa.array([None] * rejected.num_rows + [sums], pa.string()),
    })  # fmt: skip


def rejects_and_profile(
    ds, paths: RunPaths, split: str, kind: str, label_column: str, label_names: list[str],
    id_column: str, id_in: str = "id", always_write: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One pass over a preprocessed (or predicted) split: its rejects published to ``rejects/<split>`` and
    its profile sums returned (``rows``: usable rows, ``rejected``)."""
    from ray.data.expressions import col

    small = ds.map_batches(
        _rejects_and_sums, batch_format="pyarrow",
        fn_kwargs={"kind": kind, "label_column": label_column, "label_names": label_names, "id_column": id_in},
    ).materialize()  # fmt: skip
    rows = small.filter(expr=col("profile_sums").is_not_null()).select_columns(["profile_sums"]).take_all()
    sums = merge([{"rows": 0, "rejected": 0}, *(json.loads(row["profile_sums"]) for row in rows)])
    if sums.get("rejected") or always_write:
        _write_rejects(small, paths, split, id_column)
    return sums


def _check_reject_fraction(cfg: JobConfig, task: str, split: str, counts: Counts, rejects_uri: str) -> None:
    frac = counts.rejected / max(counts.read, 1)
    if frac > cfg.max_reject_fraction:
        raise DataError(
            f"{task}/{split}: {counts.rejected} of {counts.read} rows rejected ({frac:.1%}), above "
            f"max_reject_fraction {cfg.max_reject_fraction:.1%}; reasons in {rejects_uri}"
        )


# The preprocessed splits are kept in the object store for the fit when they are estimated to take at most
# this share of it (``train.materialize=auto``); larger ones are streamed from Parquet every epoch.
MATERIALIZE_SHARE_OF_OBJECT_STORE = 0.5
# Per preprocessed row besides the features: id, source path and reject reason (an allowance).
ROW_OVERHEAD_BYTES = 160


def preprocessed_bytes(task: Task, task_cfg: dict[str, Any], rows: int) -> int:
    """An estimate of ``rows`` preprocessed rows' size in the object store."""
    if task == "image":
        img = task_cfg["image"]
        features = img["channels"] * img["height"] * img["width"]  # uint8 pixels
    else:
        features = task_cfg["text"]["max_length"] * 8 + 8  # int64 tokens and length
    return rows * (features + 8 + ROW_OVERHEAD_BYTES)  # + the int64 label


def materialize_decision(mode: str | bool, nbytes: int) -> tuple[bool, str]:
    """Whether to keep the preprocessed splits (``nbytes`` together) in the object store, and why."""
    size = f"~{nbytes / 2**20:,.0f} MiB preprocessed"
    if isinstance(mode, bool):
        return mode, f"train.materialize={str(mode).lower()} ({size})"
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    fits = nbytes <= MATERIALIZE_SHARE_OF_OBJECT_STORE * store
    share = f"{MATERIALIZE_SHARE_OF_OBJECT_STORE:.0%} of the {store / 2**30:,.1f} GiB object store"
    return fits, f"{size}, {'within' if fits else 'over'} {share}"


def run_seed(cfg: JobConfig, task: Task, run_id: str) -> int:
    """The base seed of a run's shuffles: Ray Data combines it with each execution's (epoch's) index."""
    return zlib.crc32(f"{cfg.task(task).train.seed}/{run_id}".encode())


def shuffled_every_epoch(ds, shuffle: str, seed: int):
    """``ds`` with a new row order on every execution (Ray Train executes it once per epoch), drawn from
    ``seed`` and the execution's index. global: a full random shuffle; files: the block order only (the
    workers' local shuffle buffers mix rows within a window); none: as stored."""
    from ray.data import RandomSeedConfig

    if shuffle == "global":
        return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if shuffle == "files":
        return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds


def _model_rows(ds, task: Task):
    from ray.data.expressions import col

    return ds.filter(expr=col("reject_reason").is_null()).select_columns(FEATURES[task])


def _preprocessed(raw, spec: dict[str, Any]):
    return raw.map_batches(
        preprocess_for_training, batch_format="pyarrow", batch_size=1024, fn_kwargs={"spec": spec}
    )


def _account(cfg: JobConfig, task: Task, split: str, counts: Counts, paths: RunPaths, result: TaskResult):
    counts.check(f"{task}/{split}")
    result.rows[split] = counts
    _check_reject_fraction(cfg, task, split, counts, paths.uri("rejects", split))


def prepare_training_split(
    cfg: JobConfig, task: Task, data: TaskData, split: str, paths: RunPaths, result: TaskResult,
    materialize: bool, pending: list[Future],
):  # fmt: skip
    """The split as model-ready rows for the trainer; the training split with a new order every epoch
    (``train.shuffle``). Rejects are routed and counted either way.

    Materialized: read and preprocessed once, kept in the object store; each epoch shuffles the stored rows.
    Streamed: every epoch reads the Parquet files again, shuffles the raw rows (encoded images and text are
    far smaller than the decoded tensors) and preprocesses them as training consumes them, so training
    starts before preprocessing ends and memory stays bounded. Its rejects are routed by a pass of their
    own that runs alongside the fit (``pending``); its counts are checked before the model is published.
    """
    info = data.splits[split]
    task_cfg = data.meta["config"]
    spec = preprocess_spec(task, task_cfg, data.meta)
    columns = split_columns(info, task_cfg, task, with_label=True)
    shuffle = cfg.task(task).train.shuffle if split == "train" else "none"
    seed = run_seed(cfg, task, paths.run_id)
    if materialize:
        raw = read_split(info, columns=columns)
        # Stored in the files' order (not the order tasks finish in), so one seed gives one order per epoch.
        raw.context.execution_options.preserve_order = True
        with heartbeat(f"{task}: preprocessing {split} ({info.num_rows:,} rows)", cfg.progress_every_s):
            prepared = _preprocessed(raw, spec).materialize()
            ok = _model_rows(prepared, task).materialize()
        sums = rejects_and_profile(
            prepared, paths, split, task, "y", data.meta["label_names"], task_cfg["data"]["id_column"]
        )
        counts = Counts(read=info.num_rows, used=sums["rows"], rejected=sums["rejected"])
        result.profile[split] = finish(sums, task)
        _account(cfg, task, split, counts, paths, result)
        return shuffled_every_epoch(ok, shuffle, seed)

    raw = read_split(info, columns=columns, shuffle_seed=seed if shuffle == "files" else None)
    raw.context.execution_options.preserve_order = True
    if shuffle == "global":
        raw = shuffled_every_epoch(raw, "global", seed)

    def route_rejects() -> None:
        prepared = _preprocessed(read_split(info, columns=columns), spec)
        sums = rejects_and_profile(
            prepared, paths, split, task, "y", data.meta["label_names"], task_cfg["data"]["id_column"],
            always_write=True,
        )  # fmt: skip
        counts = Counts(read=info.num_rows, used=sums["rows"], rejected=sums["rejected"])
        result.profile[split] = finish(sums, task)
        _account(cfg, task, split, counts, paths, result)

    pending.append(_BACKGROUND.submit(route_rejects))
    return _model_rows(_preprocessed(raw, spec), task)


# Streamed splits route their rejects in a Ray Data job of their own, run from this thread pool.
_BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlbatch-rejects")


def training_datasets(
    cfg: JobConfig, task: Task, data: TaskData, paths: RunPaths, result: TaskResult, pending: list[Future]
) -> dict[str, Any]:
    """The trainer's ``train`` and ``val`` datasets, materialized or streamed (``train.materialize``)."""
    tcfg = cfg.task(task).train
    rows = sum(data.splits[s].num_rows for s in ("train", "val"))
    nbytes = preprocessed_bytes(task, data.meta["config"], rows)
    materialize, why = materialize_decision(tcfg.materialize, nbytes)
    log.info("%s: training data %s: %s", task, "materialized" if materialize else "streamed", why)
    datasets = {
        s: prepare_training_split(cfg, task, data, s, paths, result, materialize, pending)
        for s in ("train", "val")
    }
    if not sys.stdout.isatty():
        for ds in datasets.values():
            # Off a terminal, the workers' bars would reach the job's log a line per update; Ray Data logs
            # their progress instead (at INFO, hidden unless verbose).
            ds.context.use_ray_tqdm = False
    result.metrics["training_data"] = {"materialized": materialize, "why": why, "shuffle": tcfg.shuffle}
    return datasets


def train_model(cfg: JobConfig, task: Task, data: TaskData, paths: RunPaths, result: TaskResult) -> str:
    """Fit with Ray Train; publish the best checkpoint (by val accuracy) to ``runs/<date>/<task>/model``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = cfg.task(task).train
    model_dir = paths.path("model")
    if is_published(paths.fs, model_dir):
        log.info(
            "%s: model for %s already trained at %s; not retrained", task, paths.run_date, paths.uri("model")
        )
        marker = read_json(paths.fs, f"{model_dir}/{SUCCESS}") or {}
        result.history = marker.get("history", [])
        result.profile.update(marker.get("profile", {}))  # train and val, profiled when they were read
        result.paths["model"] = paths.uri("model")
        return paths.uri("model")
    check_cpus_left_for_data(task, tcfg.num_workers, tcfg.cpus_per_worker)
    t0 = time.perf_counter()
    pending: list[Future] = []
    datasets = training_datasets(cfg, task, data, paths, result, pending)
    result.durations_s["preprocess"] = time.perf_counter() - t0
    if result.metrics["training_data"]["materialized"]:  # a streamed split is counted as it trains
        log.info(
            "%s: preprocessed %s in %.1fs",
            task,
            _rows_line(result, ("train", "val")),
            result.durations_s["preprocess"],
        )

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "kind": task,
            "model_args": data.meta["model_args"],
            "train": tcfg.model_dump(),
            "meta": data.meta,
            "run_id": paths.run_id,
            "fit_started_at": time.time(),
        },
        datasets=datasets,
        # The training rows are dealt to the ranks in equal shards (DDP ranks take the same number of
        # steps); the validation split is not split: rank 0 validates on all of it.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})},
            placement_strategy=tcfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=paths.run_id,
            storage_path=paths.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            # Every checkpoint is kept, in the order reported; the best is picked after the fit. A score
            # attribute would also rank mid-epoch checkpoints, which have no validation score.
            checkpoint_config=ray.train.CheckpointConfig(),
        ),
    )
    try:
        fit = trainer.fit()
    finally:
        for routed in pending:  # a streamed split's rejects: its counts checked before anything is published
            routed.result()
    result.durations_s["train"] = time.perf_counter() - t0
    last = (fit.return_value or {}).get("diverged")
    if last:
        raise TrainingError(
            f"{task}: training diverged in epoch {last['epoch'] + 1}/{tcfg.epochs} (train loss "
            f"{last['train_loss']:.4g}, val loss {last['val_loss']:.4g}); nothing published; lower "
            f"{task}.train.lr (now {tcfg.lr:g}) and rerun with force=true"
        )
    best = _best_epoch_checkpoint(fit, task)
    staged = staging_dir(paths, "model")
    paths.fs.create_dir(staged, recursive=True)
    pafs.copy_files(best.path, staged, source_filesystem=best.filesystem, destination_filesystem=paths.fs)
    move_into_place(paths.fs, staged, model_dir)
    with best.as_directory() as ckpt_dir:
        from dlbatch.checkpoint import load_meta

        history = load_meta(ckpt_dir).get("history", [])
    final = fit.metrics or (history[-1] if history else {})
    result.history = _latest_history(fit, history)
    if result.history and result.history[0].get("first_batch_after_s") is not None:
        # Ray Train's fixed cost: fit() to the first training batch (the controller, the worker group, data).
        result.durations_s["train_first_batch"] = result.history[0]["first_batch_after_s"]
    # The marker carries the whole run's per-epoch history (the best checkpoint's own stops at its epoch).
    mark_published(
        paths.fs,
        model_dir,
        {"best_epoch": history[-1]["epoch"] if history else None, "history": result.history,
         "profile": {s: result.profile[s] for s in ("train", "val") if s in result.profile}},
    )  # fmt: skip
    result.metrics.update(
        {
            "best_val_accuracy": max(h["val_accuracy"] for h in result.history),
            "final_epoch": final.get("epoch"),
        }
    )
    result.paths["model"] = paths.uri("model")
    best_epoch = max(result.history, key=lambda h: (h["val_accuracy"], -h["epoch"]))
    log.info("%s: trained %d epochs in %.1fs (%s); best val accuracy %.2f%% (epoch %d), published",
             task, len(result.history), result.durations_s["train"], _rows_line(result, ("train", "val")),
             100 * best_epoch["val_accuracy"], best_epoch["epoch"] + 1)  # fmt: skip
    return paths.uri("model")


def _rows_line(result: TaskResult, splits: tuple[str, ...]) -> str:
    """``train 1,500 rows (0 rejected), val 250 rows (0 rejected)`` for the splits counted so far."""
    counted = [(s, result.rows[s]) for s in splits if s in result.rows]
    return ", ".join(f"{s} {c.used:,} rows ({c.rejected:,} rejected)" for s, c in counted)


def _best_epoch_checkpoint(fit, task: Task):
    """The validated checkpoint with the best val accuracy: one taken at the end of an epoch, never a
    mid-epoch one (``checkpoint_every_steps``), which has no validation."""
    epochs = [(ckpt, m) for ckpt, m in fit.best_checkpoints or [] if m.get("step") is None]
    if not epochs:
        raise RuntimeError(f"{task}: training finished without an end-of-epoch checkpoint")
    # Ties go to the earlier epoch, as Ray Train's get_best_checkpoint did.
    return max(epochs, key=lambda entry: (entry[1]["val_accuracy"], -entry[1]["epoch"]))[0]


def _latest_history(fit, best_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch metrics of the whole run: the latest checkpoint's history covers every epoch."""
    from dlbatch.checkpoint import load_meta

    latest = fit.checkpoint
    if latest is None:
        return best_history
    with latest.as_directory() as ckpt_dir:
        return load_meta(ckpt_dir).get("history", best_history)


def _predict_test(task: Task, data: TaskData, model_uri: str, paths: RunPaths):
    info = data.splits["test"]
    task_cfg = data.meta["config"]
    run_info = {"model_version": paths.run_id, "run_date": paths.run_date}
    reader = read_split(info, columns=split_columns(info, task_cfg, task, with_label=True))
    preds = predict_dataset(reader, model_uri, task_cfg, run_info, with_labels=True).materialize()
    table = preds.select_columns(["label_index", "pred_index", "reject_reason"]).to_pandas()
    return preds, table, table["reject_reason"].isna()


def accuracy_on_test(task: Task, data: TaskData, model_uri: str, paths: RunPaths) -> float:
    """Accuracy of any model (e.g. the champion) on this run's test split; no outputs written."""
    _, table, ok = _predict_test(task, data, model_uri, paths)
    return float((table.loc[ok, "label_index"] == table.loc[ok, "pred_index"]).mean())


def evaluate_model(
    cfg: JobConfig, task: Task, data: TaskData, model_uri: str, paths: RunPaths, result: TaskResult
) -> dict[str, Any]:
    """Test-set accuracy and confusion matrix from the same predictor that scores production data."""
    t0 = time.perf_counter()
    info = data.splits["test"]
    task_cfg = data.meta["config"]
    with heartbeat(f"{task}: evaluating on test ({info.num_rows:,} rows)", cfg.progress_every_s):
        preds, table, ok = _predict_test(task, data, model_uri, paths)
    counts = Counts(read=info.num_rows, used=int(ok.sum()), rejected=int((~ok).sum()))
    id_column = task_cfg["data"]["id_column"]
    sums = rejects_and_profile(
        preds, paths, "test", task, "label_index", data.meta["label_names"], id_column, id_in=id_column
    )
    result.profile["test"] = finish(sums, task)
    counts.check(f"{task}/test")
    result.rows["test"] = counts
    _check_reject_fraction(cfg, task, "test", counts, paths.uri("rejects", "test"))
    y_true = table.loc[ok, "label_index"].to_numpy(np.int64)
    y_pred = table.loc[ok, "pred_index"].to_numpy(np.int64)
    k = len(data.meta["label_names"])
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    metrics = {
        "test_accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "test_rows": int(len(y_true)),
        "confusion": confusion.tolist(),
        "label_names": data.meta["label_names"],
    }
    metrics["quality"] = quality_floor(
        metrics["confusion"], metrics["label_names"], metrics["test_accuracy"], cfg.quality_margin
    )
    result.metrics.update(metrics)
    result.durations_s["evaluate"] = time.perf_counter() - t0
    log.info("%s: test accuracy %.2f%% on %s in %.1fs", task, 100 * metrics["test_accuracy"],
             _rows_line(result, ("test",)), result.durations_s["evaluate"])  # fmt: skip
    if not metrics["quality"]["passed"]:
        log.warning("%s: %s", task, describe_quality(metrics["quality"]))
    return metrics


def predict_scores(
    cfg: JobConfig,
    task: Task,
    data: TaskData,
    model_uri: str,
    paths: RunPaths,
    result: TaskResult,
    model_version: str | None = None,
    gate: Callable[[dict[str, Any]], str | None] | None = None,
) -> str | None:
    """Score the score split; publish predictions and rejects all-or-nothing. Idempotent per run.
    ``gate``: given the scored split's input profile, a reason to withhold the predictions (None: publish).

    The split is scored in parts of whole files (``predict.rows_per_part`` rows at most, unless one file
    holds more). Each finished part stays in staging with a done marker, keyed by its input files (path,
    size, modification time), the model's files and the task config: a rerun after a killed attempt
    keeps the parts that finished and scores the rest; with ``force``, or once anything in a part's key
    changed, that part is scored again."""
    pred_dir = paths.path("predictions")
    if not cfg.force and is_published(paths.fs, pred_dir):
        log.info("%s: predictions already published at %s; not redone", task, paths.uri("predictions"))
        result.paths["predictions"] = paths.uri("predictions")
        return paths.uri("predictions")
    t0 = time.perf_counter()
    fs, staging, parts_dir = paths.fs, paths.path("_staging"), paths.path("_staging", "score-parts")
    # Leftovers of a killed attempt (one writer per run); its finished parts are kept unless forced.
    for leftover in fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True)):
        if cfg.force or leftover.path != parts_dir:
            remove_if_exists(fs, leftover.path)
    info = data.splits["score"]
    task_cfg = cfg.task(task).model_dump()
    id_column = task_cfg["data"]["id_column"]
    run_info = {"model_version": model_version or paths.run_id, "run_date": paths.run_date}
    model_fs, model_path = resolve_path(model_uri)
    fingerprint = {"model": tree_fingerprint(model_fs, model_path), "config": task_cfg, "run": run_info}
    inputs = file_fingerprints(info.filesystem, info.files)
    plan = plan_parts(info.file_rows, task_cfg["predict"]["rows_per_part"])
    keys = [part_key([inputs[i] for i in part], fingerprint) for part in plan]
    done = finished_parts(fs, parts_dir, set(keys))
    if done:
        log.info(
            "%s: %d of %d score parts were finished by an earlier attempt; not redone",
            task,
            len(done),
            len(plan),
        )
    columns = split_columns(info, task_cfg, task, with_label=False)
    staged = []
    for number, (key, part) in enumerate(zip(keys, plan, strict=True), 1):
        if key in done:
            staged.append(done[key])
            continue
        files = [info.files[i] for i in part]
        rows = sum(info.file_rows[i] for i in part)
        if len(plan) > 1:
            log.info(
                "%s: scoring part %d of %d (%d files, %d rows)", task, number, len(plan), len(files), rows
            )
        part_dir = f"{parts_dir}/{key}-{uuid.uuid4().hex[:12]}"
        part_info = replace(info, files=files, file_rows=[info.file_rows[i] for i in part], num_rows=rows)
        label = f"{task}: scoring" + (f" part {number} of {len(plan)}" if len(plan) > 1 else "")
        with heartbeat(label, cfg.progress_every_s, lambda d=part_dir, n=rows: _rows_written(fs, d, n)):
            predict_dataset(
                read_split(part_info, columns=columns), model_uri, task_cfg, run_info
            ).write_parquet(part_dir, filesystem=fs)
        fs.create_dir(part_dir, recursive=True)  # a part that wrote no rows still finished
        mark_published(fs, part_dir, {"files": files, "rows": rows}, marker=PART_DONE)
        staged.append(part_dir)
    result.metrics["score_parts"] = {"parts": len(plan), "reused": len(done)}
    result.profile["score"] = _staged_profile(fs, staged, task)
    withheld = gate(result.profile["score"]) if gate is not None else None
    pcfg = task_cfg["predict"]
    result.metrics["predict"] = {
        "compute": "actors" if use_actors(pcfg) else "tasks",
        "gpus_per_actor": pcfg["gpus_per_actor"] if use_actors(pcfg) else 0,
        "preprocess": "tasks" if use_actors(pcfg) and preprocess_in_tasks(pcfg) else "with the model",
    }
    if withheld:
        log.warning("%s: predictions not published: %s; the scored parts stay in staging for a rerun",
                    task, withheld)  # fmt: skip
        result.metrics["predictions_withheld"] = withheld
        return None
    keep = [id_column, *task_cfg["data"]["passthrough_columns"], *PRED_COLUMNS, "model_version", "run_date"]
    used, rejected = publish_split(
        fs, staged, pred_dir, paths.path("rejects", "score"), keep, [id_column, *REJECT_COLUMNS],
        tmp=paths.path("_staging", "publish"),
    )  # fmt: skip
    # Again after publishing: a task of a killed attempt that was still running when this run started
    # may have written its block into that attempt's staging directory since.
    remove_if_exists(paths.fs, paths.path("_staging"))
    counts = Counts(read=info.num_rows, used=used, rejected=rejected)
    counts.check(f"{task}/score")
    result.rows["score"] = counts
    result.durations_s["predict"] = time.perf_counter() - t0
    log.info("%s: scored %s in %.1fs with %s", task, _rows_line(result, ("score",)),
             result.durations_s["predict"], run_info["model_version"])  # fmt: skip
    result.paths["predictions"] = paths.uri("predictions")
    if info.has_id:
        result.metrics["duplicate_ids"] = _duplicate_ids(task, info, id_column)
    _check_reject_fraction(cfg, task, "score", counts, paths.uri("rejects", "score"))
    return paths.uri("predictions")


def _staged_profile(fs: pafs.FileSystem, staged: list[str], task: Task) -> dict[str, Any] | None:
    """The score split's input profile, from the small columns of its staged predictions (None: parts
    staged by a version of dlbatch that did not profile)."""
    dataset = staged_dataset(fs, staged)
    columns = ["reject_reason", "pred_label", *PROFILE_COLUMNS[task]]
    if dataset is None or not set(columns) <= set(dataset.schema.names):
        return None
    parts = [
        partial(pa.Table.from_batches([b]), task, "pred_label", [])
        for b in dataset.to_batches(columns=columns)
    ]
    return finish(merge(parts), task, labels_from="predictions")


def _rows_written(fs: pafs.FileSystem, directory: str, total: int) -> str:
    """Rows in the Parquet files a stage has written so far (their footers), of ``total``."""
    import pyarrow.dataset as pads

    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    written = pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0
    return f"{written:,} of {total:,} rows written"


def _duplicate_ids(task: Task, info: SplitInfo, id_column: str) -> dict[str, Any]:
    """Ids that more than one score row carries. Every row is still scored (one prediction row per input
    row), but a join of the predictions back on id is ambiguous for these, so the run says so."""
    dups = count_values(
        read_split(info, columns=[id_column]), value_counts, {"column": id_column}, min_count=2
    )
    found = {"ids": dups.num_rows, "rows": int(pc.sum(dups["count"]).as_py() or 0),
             "examples": [str(v) for v in dups["value"].slice(0, 5).to_pylist()]}  # fmt: skip
    if found["ids"]:
        log.warning("%s: %d ids appear on more than one score row (%d rows, e.g. %s); every row is scored, "
                    "so a join of the predictions on %r is ambiguous for them", task, found["ids"], found["rows"],
                    ", ".join(repr(v) for v in found["examples"][:3]), id_column)  # fmt: skip
    return found
