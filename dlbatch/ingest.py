"""Ingest stages: check a task's data from its footers, learn its labels and tokenizer, and turn the
training and validation splits into model-ready Ray Datasets, routing every rejected row."""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dlbatch.cluster import route_data_work
from dlbatch.config import TaskConfig
from dlbatch.context import RunContext
from dlbatch.data import (
    SplitInfo,
    build_label_names,
    build_tokenizer,
    inspect_split,
    label_variants,
    read_split,
    resolve_path,
    split_columns,
)
from dlbatch.demo import write_demo_data
from dlbatch.errors import DataError
from dlbatch.models import model_args_for
from dlbatch.night import Counts, Learned, SplitCheck
from dlbatch.predict import preprocess_spec
from dlbatch.preprocess import preprocess_for_training
from dlbatch.profile import finish, merge, partial
from dlbatch.progress import heartbeat
from dlbatch.store import move_into_place, read_json, staging_dir, write_json
from dlbatch.tokenizer import vocab_len as tokenizer_vocab_len
from dlbatch.train import FEATURES

log = logging.getLogger("dlbatch")
REJECT_COLUMNS = ["source", "reject_reason"]
# What a run learned from its training split, kept in its run directory (``runs/<date>/<task>/``).
LEARNED = "learned.json"


def data_paths(ctx: RunContext) -> dict[str, str | None]:
    """Configured split paths; with none configured, the demo data (generated once under output_root)."""
    data = ctx.config.data
    paths = {"train": data.train, "val": data.val, "test": data.test, "score": data.score}
    if any(paths.values()):
        return paths
    fs, root = resolve_path(ctx.job.output_root)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise DataError(
            f"{ctx.job.output_root}: demo data is only generated on local disk; set {ctx.task}.data.* paths"
        )
    log.info("%s: no data paths configured, using the demo data", ctx.task)
    return write_demo_data(f"{root}/demo-data", ctx.task, ctx.job.demo_rows, seed=0)


def check_data(ctx: RunContext) -> dict[str, SplitInfo]:
    """Fail fast on bad datasets from Parquet footers alone (no Ray needed, nothing started yet)."""
    paths = data_paths(ctx)
    found: dict[str, SplitInfo] = {}
    for split in ctx.splits:
        if not paths.get(split):
            raise DataError(f"{ctx.task}.data.{split}: no path configured")
        found[split] = inspect_split(split, paths[split], ctx.config, ctx.task, needs_label=split != "score")
    return found


def learn(ctx: RunContext, splits: dict[str, SplitInfo]) -> Learned:
    """Label map and (text) tokenizer from the training split, with Ray Data; saved with every checkpoint.

    The first attempt of a run date saves what it learned in its run directory and a later one (a retry
    that resumes the fit from its checkpoints) reuses it: the tokenizer's trainer is not deterministic, and
    a resumed model must keep the token ids it was trained with. ``force`` deletes it with the run."""
    paths, task = ctx.paths, ctx.task
    saved = read_json(paths.fs, paths.path(LEARNED))
    if saved is not None:
        log.info(
            "%s: label map%s of this run's first attempt reused", task, " and tokenizer" * (task == "text")
        )
        return Learned.from_saved(saved)
    train = splits["train"]
    route_data_work(ctx.job, task)
    names = build_label_names(train, ctx.config)
    variants = label_variants(names) if train.label_type == "string" else []
    for group in variants:
        log.warning("%s: labels %s differ only by case or surrounding spaces; they are kept as %d classes",
                    task, ", ".join(repr(v) for v in group), len(group))  # fmt: skip
    tokenizer = max_length = vocab_len = None
    if task == "text":
        with heartbeat(f"{task}: training the tokenizer", ctx.job.progress_every_s):
            tokenizer = build_tokenizer(train, ctx.config.text, ctx.config.train.seed)
        max_length, vocab_len = ctx.config.text.max_length, tokenizer_vocab_len(tokenizer)
    learned = Learned(
        label_type=train.label_type, label_names=names, label_variants=variants,
        model_args=model_args_for(ctx.config, len(names), vocab_len), tokenizer=tokenizer, max_length=max_length,
    )  # fmt: skip
    write_json(paths.fs, paths.path(LEARNED), learned.saved())
    return learned


def checkpoint_meta(ctx: RunContext, learned: Learned) -> dict[str, Any]:
    """What every checkpoint of the model carries: its kind, what it learned, and the task config."""
    return {"kind": ctx.task, "config": ctx.config.model_dump(mode="json"), **learned.saved()}


@dataclass(frozen=True)
class Routing:
    """How one pass over a preprocessed (or predicted) split finds its rejects and labels."""

    label_column: str  # "y" in preprocessed rows, "label_index" in predictions
    label_names: list[str]
    id_in: str = "id"  # the id column of the rows passed; published under the configured id column
    always_write: bool = False  # publish rejects/<split> even when it is empty (a streamed split)


def _rejects_and_sums(batch: pa.Table, kind: str, routing: Routing) -> pa.Table:
    """``map_batches``: a batch's rejected rows (id, source, reason) and one row more that carries the
    batch's profile sums (JSON), so one pass over a split routes its rejects and profiles it."""
    rejected = batch.filter(pc.is_valid(batch.column("reject_reason")))
    sums = json.dumps(partial(batch, kind, routing.label_column, routing.label_names))

    def column(name: str, type_: pa.DataType) -> pa.Array:
        values = rejected.column(name).combine_chunks().cast(type_)
        return pa.concat_arrays([values, pa.nulls(1, type_)])

    ids = batch.column(routing.id_in).type
    return pa.table({
        "id": column(routing.id_in, ids), "source": column("source", pa.string()),
        "reject_reason": column("reject_reason", pa.string()),
        "profile_sums": pa.array([None] * rejected.num_rows + [sums], pa.string()),
    })  # fmt: skip


def _write_rejects(ctx: RunContext, ds, split: str) -> int:
    """Publish the split's rejected rows (id, source, reason); returns how many there were."""
    import pyarrow.dataset as pads
    from ray.data.expressions import col

    paths = ctx.paths
    staged = staging_dir(paths, f"rejects-{split}")
    ds.filter(expr=col("reject_reason").is_not_null()).select_columns(["id", *REJECT_COLUMNS]).rename_columns(
        {"id": ctx.config.data.id_column}
    ).write_parquet(staged, filesystem=paths.fs)
    paths.fs.create_dir(staged, recursive=True)  # no rejects written: publish an empty directory
    written = pads.dataset(staged, filesystem=paths.fs, format="parquet").count_rows()
    move_into_place(paths.fs, staged, paths.path("rejects", split))
    return written


def route_rejects(ctx: RunContext, ds, split: str, routing: Routing) -> dict[str, Any]:
    """One pass over a split: its rejects published to ``rejects/<split>``, its profile sums returned
    (``rows``: usable rows, ``rejected``)."""
    from ray.data.expressions import col

    small = ds.map_batches(
        _rejects_and_sums, batch_format="pyarrow", fn_kwargs={"kind": ctx.task, "routing": routing}
    ).materialize()
    rows = small.filter(expr=col("profile_sums").is_not_null()).select_columns(["profile_sums"]).take_all()
    sums = merge([{"rows": 0, "rejected": 0}, *(json.loads(row["profile_sums"]) for row in rows)])
    if sums.get("rejected") or routing.always_write:
        _write_rejects(ctx, small, split)
    return sums


def accept(ctx: RunContext, split: str, counts: Counts) -> None:
    """Every row read was used or rejected, and no more were rejected than ``max_reject_fraction``."""
    counts.check(f"{ctx.task}/{split}")
    frac = counts.rejected / max(counts.read, 1)
    if frac > ctx.job.max_reject_fraction:
        raise DataError(
            f"{ctx.task}/{split}: {counts.rejected} of {counts.read} rows rejected ({frac:.1%}), above "
            f"max_reject_fraction {ctx.job.max_reject_fraction:.1%}; reasons in {ctx.paths.uri('rejects', split)}"
        )


# The preprocessed splits are kept in the object store for the fit when they are estimated to take at most
# this share of it (``train.materialize=auto``); larger ones are streamed from Parquet every epoch.
MATERIALIZE_SHARE_OF_OBJECT_STORE = 0.5
# Per preprocessed row besides the features: id, source path and reject reason (an allowance).
ROW_OVERHEAD_BYTES = 160


def preprocessed_bytes(task_cfg: TaskConfig, rows: int) -> int:
    """An estimate of ``rows`` preprocessed rows' size in the object store."""
    if hasattr(task_cfg, "image"):
        features = task_cfg.image.channels * task_cfg.image.height * task_cfg.image.width  # uint8 pixels
    else:
        features = task_cfg.text.max_length * 8 + 8  # int64 tokens and length
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


@dataclass(frozen=True)
class TrainingData:
    """The trainer's datasets, and each split's routed rows: a value now (materialized) or a future that
    a pass of its own, running alongside the fit, resolves (streamed)."""

    datasets: dict[str, Any]
    checks: dict[str, SplitCheck | Future]
    materialized: bool
    why: str


def _model_rows(ds, task: str):
    from ray.data.expressions import col

    return ds.filter(expr=col("reject_reason").is_null()).select_columns(FEATURES[task])


def _preprocessed(raw, spec: dict[str, Any]):
    return raw.map_batches(
        preprocess_for_training, batch_format="pyarrow", batch_size=1024, fn_kwargs={"spec": spec}
    )


def _checked(ctx: RunContext, info: SplitInfo, sums: dict[str, Any]) -> SplitCheck:
    counts = Counts(read=info.num_rows, used=sums["rows"], rejected=sums["rejected"])
    accept(ctx, info.name, counts)
    return SplitCheck(counts, finish(sums, ctx.task))


# Streamed splits route their rejects in a Ray Data job of their own, run from this thread pool.
_BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlbatch-rejects")


def _training_split(ctx: RunContext, info: SplitInfo, learned: Learned, materialize: bool):
    """The split as model-ready rows, the training split with a new order every epoch (``train.shuffle``),
    and its routed rows (a ``SplitCheck``, or a future of one).

    Materialized: read and preprocessed once, kept in the object store; each epoch shuffles the stored rows.
    Streamed: every epoch reads the Parquet files again, shuffles the raw rows (encoded images and text are
    far smaller than the decoded tensors) and preprocesses them as training consumes them, so training
    starts before preprocessing ends and memory stays bounded."""
    spec = preprocess_spec(ctx.task, ctx.config, checkpoint_meta(ctx, learned))
    columns = split_columns(info, ctx.config, with_label=True)
    shuffle = ctx.config.train.shuffle if info.name == "train" else "none"
    routing = Routing("y", learned.label_names, always_write=not materialize)
    if materialize:
        raw = read_split(info, columns=columns)
        # Stored in the files' order (not the order tasks finish in), so one seed gives one order per epoch.
        raw.context.execution_options.preserve_order = True
        label = f"{ctx.task}: preprocessing {info.name} ({info.num_rows:,} rows)"
        with heartbeat(label, ctx.job.progress_every_s):
            prepared = _preprocessed(raw, spec).materialize()
            ok = _model_rows(prepared, ctx.task).materialize()
        check = _checked(ctx, info, route_rejects(ctx, prepared, info.name, routing))
        return shuffled_every_epoch(ok, shuffle, ctx.seed), check
    raw = read_split(info, columns=columns, shuffle_seed=ctx.seed if shuffle == "files" else None)
    raw.context.execution_options.preserve_order = True
    if shuffle == "global":
        raw = shuffled_every_epoch(raw, "global", ctx.seed)

    def routed() -> SplitCheck:
        prepared = _preprocessed(read_split(info, columns=columns), spec)
        return _checked(ctx, info, route_rejects(ctx, prepared, info.name, routing))

    return _model_rows(_preprocessed(raw, spec), ctx.task), _BACKGROUND.submit(routed)


def training_data(ctx: RunContext, splits: dict[str, SplitInfo], learned: Learned) -> TrainingData:
    """The trainer's ``train`` and ``val`` datasets, materialized or streamed (``train.materialize``)."""
    rows = sum(splits[s].num_rows for s in ("train", "val"))
    materialize, why = materialize_decision(
        ctx.config.train.materialize, preprocessed_bytes(ctx.config, rows)
    )
    log.info("%s: training data %s: %s", ctx.task, "materialized" if materialize else "streamed", why)
    datasets, checks = {}, {}
    for split in ("train", "val"):
        datasets[split], checks[split] = _training_split(ctx, splits[split], learned, materialize)
    if not sys.stdout.isatty():
        for ds in datasets.values():
            # Off a terminal, the workers' bars would reach the job's log a line per update; Ray Data logs
            # their progress instead (at INFO, hidden unless verbose).
            ds.context.use_ray_tqdm = False
    return TrainingData(datasets, checks, materialize, why)
