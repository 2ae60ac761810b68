"""The night, in order. This module alone decides what runs when and builds the night's state.

    check data -> learn (labels, tokenizer) -> fit -> evaluate -> drift -> (nightly) promote -> score
    -> verdict -> publish summary and report -> tracking

Each ``run_*`` takes a ``JobConfig`` and returns one summary dict per task (each also ``summary.json``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from dlbatch import gate
from dlbatch.cluster import ensure_ray
from dlbatch.config import JobConfig
from dlbatch.context import Mode, RunContext
from dlbatch.data import SplitInfo
from dlbatch.errors import QualityError
from dlbatch.evaluate import evaluate_model, scores_on_test
from dlbatch.fit import fit_model, prune_checkpoints
from dlbatch.ingest import check_data, learn
from dlbatch.night import Learned, Night, build_summary
from dlbatch.publish import (
    apply_promotion,
    drift_references,
    finished_night,
    forget_run,
    mark_finished,
    scoring_model,
    store_candidate,
    write_summary,
)
from dlbatch.score import publish_predictions, stage_predictions
from dlbatch.tracking import log_night

log = logging.getLogger("dlbatch")


def run_train(cfg: JobConfig) -> list[dict[str, Any]]:
    return _run_training(cfg, "train")


def run_nightly(cfg: JobConfig) -> list[dict[str, Any]]:
    return _run_training(cfg, "nightly")


def _run_training(cfg: JobConfig, mode: Mode) -> list[dict[str, Any]]:
    contexts = [RunContext(cfg, task, mode) for task in cfg.tasks]
    # Every split of every task is checked from its Parquet footers before Ray starts, and every task's
    # labels (and tokenizer) are learned before any task trains: a bad second task fails before the first.
    splits = {ctx.task: check_data(ctx) for ctx in contexts}
    for ctx in contexts:
        rows = ", ".join(
            f"{s} {i.num_rows:,} rows in {len(i.files)} file(s)" for s, i in splits[ctx.task].items()
        )
        log.info("plan: %s for %s: %s", ctx.task, ctx.paths.run_date, rows)
    ensure_ray(cfg)
    finished = {ctx.task: finished_night(ctx) for ctx in contexts}
    learned = {}
    for ctx in contexts:
        if finished[ctx.task] is None:
            if cfg.force:
                forget_run(ctx)
            learned[ctx.task] = learn(ctx, splits[ctx.task])
    summaries = [
        finished[ctx.task] or _train_night(ctx, splits[ctx.task], learned[ctx.task]) for ctx in contexts
    ]
    failure = gate.job_failure(summaries)
    if failure:
        raise QualityError(failure, summaries)
    return summaries


def _train_night(ctx: RunContext, splits: dict[str, SplitInfo], learned: Learned) -> dict[str, Any]:
    started = time.perf_counter()
    fit = fit_model(ctx, splits, learned)
    warnings = gate.data_warnings(ctx.config, fit.splits["train"].profile if "train" in fit.splits else None)
    for line in warnings:
        log.warning("%s", line)
    pruned = prune_checkpoints(ctx)
    evaluation = evaluate_model(ctx, splits, learned, fit.model_uri)
    blocks = gate.Blocks(floor=gate.floor_failure(evaluation.quality))
    references = drift_references(ctx)
    drift = None
    if ctx.config.profile:
        profiles = {**{s: c.profile for s, c in fit.splits.items()}, "test": evaluation.test.profile}
        drift = gate.check_drift(profiles, references, ctx.task, ctx.job.drift)
    promotion = scoring = None
    if ctx.mode == "nightly":
        blocks = replace(blocks, drift=gate.drift_block(drift))
        candidate = store_candidate(ctx)
        # The champion is re-measured on tonight's test data (its own number was on other data).
        metric, rival = ctx.job.gate_metric, None
        if candidate.rival is not None:
            measured = None
            if not blocks.reason:
                measured = scores_on_test(ctx, splits["test"], candidate.rival_uri, learned)[metric]
            rival = (candidate.rival["version"], measured)
        decision = gate.decide_promotion(
            (candidate.version, evaluation.scores[metric]), rival, ctx.job, blocks.reason
        )
        promotion = apply_promotion(ctx, candidate, decision, evaluation.accuracy)
        if promotion.champion is not None:
            staged = stage_predictions(ctx, splits["score"], promotion.champion)
            score_drift = None
            if drift is not None and not staged.published:
                score_drift = gate.check_drift({"score": staged.profile}, references, ctx.task, ctx.job.drift)
                drift = drift.plus(score_drift)
            scoring = publish_predictions(ctx, staged, withheld=gate.drift_block(score_drift))
        withheld = scoring.withheld if scoring else None
        verdict = gate.nightly_verdict(blocks, drift, decision, withheld)
    else:
        if drift is not None:
            drift = replace(drift, blocked=False)  # this job promotes and scores nothing: nothing to block
        verdict = gate.train_verdict(blocks.floor, drift, evaluation.accuracy)
    night = Night(
        task=ctx.task, run_id=ctx.run_id, config=ctx.config.model_dump(mode="json"),
        seconds=time.perf_counter() - started, fit=fit, evaluation=evaluation, learned=learned, drift=drift,
        pruned_checkpoint_runs=pruned, promotion=promotion, scoring=scoring, verdict=verdict,
        data_warnings=warnings,
    )  # fmt: skip
    summary = build_summary(night, ctx.paths.uri("summary.json"), ctx.paths.uri("report.html"))
    page = write_summary(ctx, summary)
    if ctx.mode == "nightly" and not (drift and drift.blocked):
        # The whole nightly run is done. A night that drift blocked is not: rerun with drift.action=warn
        # to accept it (its model and scored parts are reused).
        mark_finished(ctx)
    log_night(ctx.job, summary, ctx.paths, page)  # after everything is published: it can only cost a warning
    return summary


def run_predict(cfg: JobConfig, model: str | None = None) -> list[dict[str, Any]]:
    """Score each task's score split with its champion, or with ``model`` (any model directory or URI;
    the predictions' ``model_version`` is then that path or URI)."""
    contexts = [RunContext(cfg, task, "predict") for task in cfg.tasks]
    splits = {ctx.task: check_data(ctx) for ctx in contexts}
    chosen = {ctx.task: scoring_model(ctx, model) for ctx in contexts}
    ensure_ray(cfg)
    summaries = []
    for ctx in contexts:
        started = time.perf_counter()
        staged = stage_predictions(ctx, splits[ctx.task]["score"], chosen[ctx.task])
        scoring = publish_predictions(ctx, staged)
        night = Night(ctx.task, ctx.run_id, ctx.config.model_dump(mode="json"), time.perf_counter() - started,
                      scoring=scoring, model_uri=chosen[ctx.task].uri)  # fmt: skip
        summaries.append(build_summary(night))
    return summaries
