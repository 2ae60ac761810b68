"""summary.json is made by one function from the night's typed values; its keys are pinned here, so the
report, MLflow tracking and users' scripts keep working key for key (tests/test_nightly_ops.py holds a real
night's summary to the same keys)."""

from __future__ import annotations

import json

from dlbatch import gate
from dlbatch.config import DriftConfig, JobConfig
from dlbatch.night import (
    Counts,
    Evaluation,
    Fit,
    Learned,
    Night,
    Promotion,
    Scoring,
    ScoringModel,
    SplitCheck,
    build_summary,
)

TOP = {"verdict", "task", "run_id", "versions", "config", "test_accuracy", "metrics", "history", "rows",
       "profile", "drift", "data_warnings", "paths", "durations_s"}  # fmt: skip
METRICS = {"training_data", "best_val_accuracy", "final_epoch", "deleted_checkpoint_runs", "test_accuracy",
           "test_macro_f1", "test_balanced_accuracy", "test_rows", "confusion", "label_names", "quality", "label_variants", "promotion", "score_parts",
           "predict", "duplicate_ids"}  # fmt: skip
PROMOTION = {"promoted", "champion_version", "reason", "candidate_accuracy", "previous_version",
             "previous_accuracy_same_test", "metric", "deleted_versions", "replaced_version"}  # fmt: skip
DRIFT = {"threshold", "action", "references", "reference_profiles", "distances", "drifted", "blocked"}
PATHS = {"model", "champion", "predictions", "summary", "report"}
DURATIONS = {"preprocess", "train", "train_first_batch", "evaluate", "predict", "total"}
SPLITS = {"train", "val", "test", "score"}


def _job(tolerance: float) -> JobConfig:
    return JobConfig(promotion_tolerance=tolerance)


def _scored_night() -> Night:
    counts = Counts(read=10, used=9, rejected=1)
    profile = {"rows": 9, "labels": {"a": 5, "b": 4}}
    history = [{"epoch": e, "val_accuracy": 0.5 + e / 10, "first_batch_after_s": 3.0} for e in range(2)]
    fit = Fit(
        "/out/runs/2026-11-25/text/model", history,
        {s: SplitCheck(counts, profile) for s in ("train", "val")},
        {"materialized": True, "why": "fits", "shuffle": "global"},
        {"preprocess": 1.0, "train": 20.0, "train_first_batch": 3.0}, final_epoch=1,
    )  # fmt: skip
    quality = {"floor": 0.6, "passed": True}
    scores = {"accuracy": 0.8, "macro_f1": 0.79, "balanced_accuracy": 0.78}
    evaluation = Evaluation(
        scores, 9, [[4, 1], [1, 3]], ["a", "b"], quality, SplitCheck(counts, profile), 2.0
    )
    decision = gate.decide_promotion(("2026-11-25", 0.8), ("2026-11-24", 0.78), _job(0.01), None)
    champion = ScoringModel("/out/models/text/versions/2026-11-25", "text-2026-11-25")
    scoring = Scoring("/out/runs/2026-11-25/text/predictions", counts, profile, {"parts": 1, "reused": 0},
                      {"compute": "tasks"}, duplicate_ids={"ids": 0, "rows": 0, "examples": []}, seconds=4.0)  # fmt: skip
    references = {"previous": ("the previous night", {"train": profile})}
    drift = gate.check_drift({"train": profile}, references, "text", DriftConfig())
    return Night(
        task="text", run_id="text-2026-11-25", config={"train": {"epochs": 2}}, seconds=30.0, fit=fit,
        evaluation=evaluation, learned=Learned("string", ["a", "b"], {"num_classes": 2}), drift=drift,
        pruned_checkpoint_runs=[], promotion=Promotion(decision, [], False, champion), scoring=scoring,
        verdict=gate.nightly_verdict(gate.Blocks(), drift, decision, None),
    )  # fmt: skip


def assert_summary_keys(summary: dict) -> None:
    """A scored night's summary: every key that summary.json has carried, and no other."""
    assert set(summary) == TOP
    assert set(summary["metrics"]) == METRICS
    assert set(summary["metrics"]["promotion"]) == PROMOTION
    assert set(summary["drift"]) == DRIFT
    assert set(summary["paths"]) == PATHS
    assert set(summary["durations_s"]) == DURATIONS
    assert set(summary["rows"]) == set(summary["profile"]) == SPLITS
    assert set(summary["verdict"]) == {"status", "reason"}
    assert set(summary["versions"]) == {"dlbatch", "ray", "torch", "git_commit"}


def test_a_scored_nights_summary_has_every_key_and_is_json():
    summary = build_summary(_scored_night(), "/out/runs/2026-11-25/text/summary.json", "/out/report.html")
    assert_summary_keys(summary)
    assert json.loads(json.dumps(summary)) == summary  # plain JSON values throughout
    assert summary["rows"]["score"] == {"read": 10, "used": 9, "rejected": 1}
    assert summary["metrics"]["best_val_accuracy"] == 0.6 and summary["test_accuracy"] == 0.8
    assert summary["verdict"] == {
        "status": "promoted",
        "reason": f"promoted: {summary['metrics']['promotion']['reason']}",
    }
    assert summary["paths"]["champion"] == "/out/models/text/versions/2026-11-25"
    assert summary["durations_s"]["total"] == 30.0 and summary["durations_s"]["predict"] == 4.0


def test_a_night_trained_earlier_keeps_its_profiles_without_counts():
    """A retried run finds its model published: the marker kept train/val profiles, not their counts."""
    night = _scored_night()
    fit = Fit(night.fit.model_uri, night.fit.history, {"train": SplitCheck(None, {"rows": 9})})
    summary = build_summary(Night("text", "text-2026-11-25", {}, 1.0, fit=fit, evaluation=night.evaluation))
    assert set(summary["rows"]) == {"test"} and set(summary["profile"]) == {"train", "test"}
    assert "training_data" not in summary["metrics"] and "verdict" not in summary
    assert set(summary["durations_s"]) == {"evaluate", "total"}


def test_withheld_predictions_are_a_metric_and_have_no_counts():
    night = _scored_night()
    withheld = Scoring(
        None, None, {"rows": 9}, {"parts": 1, "reused": 0}, {"compute": "tasks"}, withheld="drift"
    )
    summary = build_summary(
        Night("text", "text-2026-11-25", {}, 1.0, scoring=withheld, promotion=night.promotion)
    )
    assert summary["metrics"]["predictions_withheld"] == "drift"
    assert "score" not in summary["rows"] and summary["profile"]["score"] == {"rows": 9}
    assert "predictions" not in summary["paths"] and summary["paths"]["champion"]
