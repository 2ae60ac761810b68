"""The score stage: the score split's predictions, staged in parts, then published all-or-nothing (or
withheld, when the flow's drift check says so)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dlbatch.cluster import route_data_work
from dlbatch.context import RunContext
from dlbatch.data import SplitInfo, count_values, read_split, resolve_path, split_columns, value_counts
from dlbatch.ingest import REJECT_COLUMNS, accept
from dlbatch.night import Counts, Scoring, ScoringModel, SplitCheck, rows_line
from dlbatch.predict import PRED_COLUMNS, predict_dataset, preprocess_in_tasks, use_actors
from dlbatch.profile import PROFILE_COLUMNS, finish, merge, partial
from dlbatch.progress import heartbeat
from dlbatch.store import (
    PART_DONE,
    file_fingerprints,
    finished_parts,
    is_published,
    mark_published,
    part_key,
    plan_parts,
    publish_split,
    remove_if_exists,
    staged_dataset,
    tree_fingerprint,
)

log = logging.getLogger("dlbatch")


@dataclass(frozen=True)
class Staged:
    """The score split scored into staging, not yet published (``published``: an earlier attempt did)."""

    split: SplitInfo
    model: ScoringModel
    dirs: list[str]
    parts: dict[str, int]
    profile: dict[str, Any] | None
    started: float
    published: str | None = None


def _compute(ctx: RunContext) -> dict[str, Any]:
    pcfg = ctx.config.predict
    actors = use_actors(pcfg)
    return {"compute": "actors" if actors else "tasks", "gpus_per_actor": pcfg.gpus_per_actor if actors else 0,
            "preprocess": "tasks" if actors and preprocess_in_tasks(pcfg) else "with the model"}  # fmt: skip


def stage_predictions(ctx: RunContext, score: SplitInfo, model: ScoringModel) -> Staged:
    """Score the score split into staging, in parts of whole files (``predict.rows_per_part`` rows at most,
    unless one file holds more). Each finished part stays in staging with a done marker, keyed by its input
    files (path, size, modification time), the model's files and the task config: a rerun after a killed
    attempt keeps the parts that finished and scores the rest; with ``force``, or once anything in a part's
    key changed, that part is scored again."""
    paths, force, task = ctx.paths, ctx.job.force, ctx.task
    if not force and is_published(paths.fs, paths.path("predictions")):
        log.info("%s: predictions already published at %s; not redone", task, paths.uri("predictions"))
        return Staged(score, model, [], {}, None, time.perf_counter(), published=paths.uri("predictions"))
    route_data_work(ctx.job, task)
    t0 = time.perf_counter()
    fs, staging, parts_dir = paths.fs, paths.path("_staging"), paths.path("_staging", "score-parts")
    # Leftovers of a killed attempt (one writer per run); its finished parts are kept unless forced.
    for leftover in fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True)):
        if force or leftover.path != parts_dir:
            remove_if_exists(fs, leftover.path)
    run_info = {"model_version": model.version, "run_date": paths.run_date}
    model_fs, model_path = resolve_path(model.uri)
    fingerprint = {"model": tree_fingerprint(model_fs, model_path), "config": ctx.config.model_dump(mode="json"),
                   "run": run_info}  # fmt: skip
    inputs = file_fingerprints(score.filesystem, score.files)
    plan = plan_parts(score.file_rows, ctx.config.predict.rows_per_part)
    keys = [part_key([inputs[i] for i in part], fingerprint) for part in plan]
    done = finished_parts(fs, parts_dir, set(keys))
    if done:
        log.info(
            "%s: %d of %d score parts were finished by an earlier attempt; not redone",
            task,
            len(done),
            len(plan),
        )
    columns = split_columns(score, ctx.config, with_label=False)
    staged = []
    for number, (key, part) in enumerate(zip(keys, plan, strict=True), 1):
        if key in done:
            staged.append(done[key])
            continue
        files = [score.files[i] for i in part]
        rows = sum(score.file_rows[i] for i in part)
        if len(plan) > 1:
            log.info(
                "%s: scoring part %d of %d (%d files, %d rows)", task, number, len(plan), len(files), rows
            )
        part_dir = f"{parts_dir}/{key}-{uuid.uuid4().hex[:12]}"
        part_info = replace(score, files=files, file_rows=[score.file_rows[i] for i in part], num_rows=rows)
        label = f"{task}: scoring" + (f" part {number} of {len(plan)}" if len(plan) > 1 else "")
        with heartbeat(label, ctx.job.progress_every_s, lambda d=part_dir, n=rows: _rows_written(fs, d, n)):
            predict_dataset(
                read_split(part_info, columns=columns), model.uri, ctx.config, run_info
            ).write_parquet(part_dir, filesystem=fs)
        fs.create_dir(part_dir, recursive=True)  # a part that wrote no rows still finished
        mark_published(fs, part_dir, {"files": files, "rows": rows}, marker=PART_DONE)
        staged.append(part_dir)
    parts = {"parts": len(plan), "reused": len(done)}
    return Staged(score, model, staged, parts, _staged_profile(fs, staged, task), t0)


def publish_predictions(ctx: RunContext, staged: Staged, withheld: str | None = None) -> Scoring:
    """Publish the staged predictions and the score split's rejects in one step; ``withheld``: why they
    stay in staging instead (a rerun finds the scored parts there)."""
    if staged.published:
        return Scoring(staged.published)
    paths, task, score = ctx.paths, ctx.task, staged.split
    if withheld:
        log.warning("%s: predictions not published: %s; the scored parts stay in staging for a rerun",
                    task, withheld)  # fmt: skip
        return Scoring(None, None, staged.profile, staged.parts, _compute(ctx), withheld=withheld)
    id_column = ctx.config.data.id_column
    keep = [id_column, *ctx.config.data.passthrough_columns, *PRED_COLUMNS, "model_version", "run_date"]
    used, rejected = publish_split(
        paths.fs, staged.dirs, paths.path("predictions"), paths.path("rejects", "score"), keep,
        [id_column, *REJECT_COLUMNS], tmp=paths.path("_staging", "publish"),
    )  # fmt: skip
    # Again after publishing: a task of a killed attempt that was still running when this run started
    # may have written its block into that attempt's staging directory since.
    remove_if_exists(paths.fs, paths.path("_staging"))
    counts = Counts(read=score.num_rows, used=used, rejected=rejected)
    counts.check(f"{task}/score")
    seconds = time.perf_counter() - staged.started
    log.info("%s: scored %s in %.1fs with %s", task, rows_line({"score": SplitCheck(counts)}), seconds,
             staged.model.version)  # fmt: skip
    duplicates = _duplicate_ids(task, score, id_column) if score.has_id else None
    accept(ctx, "score", counts)
    return Scoring(paths.uri("predictions"), counts, staged.profile, staged.parts, _compute(ctx),
                   duplicate_ids=duplicates, seconds=seconds)  # fmt: skip


def _staged_profile(fs: pafs.FileSystem, staged: list[str], task: str) -> dict[str, Any] | None:
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

    entries = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    files = [i.path for i in entries if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    written = pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0
    return f"{written:,} of {total:,} rows written"


def _duplicate_ids(task: str, info: SplitInfo, id_column: str) -> dict[str, Any]:
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
