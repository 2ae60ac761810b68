"""The evaluate stage: test-set metrics from the same predictor that scores production data."""

from __future__ import annotations

import logging
import time

import numpy as np

from dlbatch.cluster import route_data_work
from dlbatch.context import RunContext
from dlbatch.data import SplitInfo, read_split, split_columns
from dlbatch.ingest import Routing, accept, route_rejects
from dlbatch.night import Counts, Evaluation, Learned, SplitCheck, rows_line
from dlbatch.predict import predict_dataset
from dlbatch.profile import finish
from dlbatch.progress import heartbeat
from dlbatch.quality import describe as describe_quality
from dlbatch.quality import quality_floor, scores

log = logging.getLogger("dlbatch")


def _predict_test(ctx: RunContext, test: SplitInfo, model_uri: str):
    run_info = {"model_version": ctx.run_id, "run_date": ctx.paths.run_date}
    reader = read_split(test, columns=split_columns(test, ctx.config, with_label=True))
    preds = predict_dataset(reader, model_uri, ctx.config, run_info, with_labels=True).materialize()
    table = preds.select_columns(["label_index", "pred_index", "reject_reason"]).to_pandas()
    return preds, table, table["reject_reason"].isna()


def _confusion(table, ok, k: int) -> np.ndarray:
    y_true = table.loc[ok, "label_index"].to_numpy(np.int64)
    y_pred = table.loc[ok, "pred_index"].to_numpy(np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return confusion


def scores_on_test(ctx: RunContext, test: SplitInfo, model_uri: str, learned: Learned) -> dict[str, float]:
    """Test metrics of any model (e.g. the champion) on this run's test split; no outputs written."""
    _, table, ok = _predict_test(ctx, test, model_uri)
    return scores(_confusion(table, ok, len(learned.label_names)))


def evaluate_model(
    ctx: RunContext, splits: dict[str, SplitInfo], learned: Learned, model_uri: str
) -> Evaluation:
    """Test accuracy, confusion matrix and the quality floor's baselines; the test split's rejects and
    profile from the same pass."""
    t0 = time.perf_counter()
    test = splits["test"]
    route_data_work(ctx.job, ctx.task)
    with heartbeat(f"{ctx.task}: evaluating on test ({test.num_rows:,} rows)", ctx.job.progress_every_s):
        preds, table, ok = _predict_test(ctx, test, model_uri)
    counts = Counts(read=test.num_rows, used=int(ok.sum()), rejected=int((~ok).sum()))
    id_column = ctx.config.data.id_column
    sums = route_rejects(ctx, preds, "test", Routing("label_index", learned.label_names, id_in=id_column))
    accept(ctx, "test", counts)
    confusion = _confusion(table, ok, len(learned.label_names))
    got = scores(confusion)
    quality = quality_floor(
        confusion.tolist(), learned.label_names, ctx.job.quality_margin, ctx.job.gate_metric
    )
    check = SplitCheck(counts, finish(sums, ctx.task))
    evaluation = Evaluation(got, int(confusion.sum()), confusion.tolist(), learned.label_names, quality, check,
                            time.perf_counter() - t0)  # fmt: skip
    log.info("%s: test accuracy %.2f%% (macro-F1 %.2f%%, balanced accuracy %.2f%%) on %s in %.1fs", ctx.task,
             100 * got["accuracy"], 100 * got["macro_f1"], 100 * got["balanced_accuracy"],
             rows_line({"test": check}), evaluation.seconds)  # fmt: skip
    if not quality["passed"]:
        log.warning("%s: %s", ctx.task, describe_quality(quality))
    return evaluation
