"""The test metrics and the quality floor's numbers on known inputs (no Ray needed)."""

from __future__ import annotations

import re

import pytest

from dlbatch.quality import describe, majority_scores, quality_floor, scores
from dlbatch.registry import ModelStore
from dlbatch.store import mark_published, run_paths


def test_the_floor_is_above_the_majority_baseline_by_a_share_of_its_errors():
    # Test split: 60 / 30 / 10 rows. Majority baseline 60%; floor 60% + 0.2 x 40% = 68%.
    confusion = [[50, 5, 5], [10, 20, 0], [2, 1, 7]]  # 77 of 100 right
    q = quality_floor(confusion, ["a", "b", "c"], margin=0.2)
    assert q["majority_class"] == "a"
    assert q["majority_accuracy"] == pytest.approx(0.60)
    assert q["chance_accuracy"] == pytest.approx(1 / 3)
    assert q["floor"] == pytest.approx(0.68)
    assert q["passed"] is True
    worse = [[50, 5, 5], [15, 15, 0], [5, 3, 2]]  # 67 of 100
    assert quality_floor(worse, ["a", "b", "c"], margin=0.2)["passed"] is False
    # Skewed classes: "always a" scores 90% and does not pass a floor of 92%.
    skewed = quality_floor([[90, 0], [10, 0]], ["a", "b"], margin=0.2)
    assert skewed["floor"] == pytest.approx(0.92) and skewed["passed"] is False
    assert describe(skewed) == (
        "test accuracy 90.00% is below the quality floor 92.00% (majority class 'a' alone scores 90.00%, "
        "chance 50.00%; quality_margin=0.2)"
    )
    assert quality_floor([[0, 0], [0, 0]], ["a", "b"], margin=0.2)["passed"] is False


def test_macro_f1_and_balanced_accuracy_by_hand():
    # Recalls 50/60, 20/30, 7/10; precisions 50/62, 20/26, 7/12; F1 0.8197, 0.7143, 0.6364.
    got = scores([[50, 5, 5], [10, 20, 0], [2, 1, 7]])
    assert got["accuracy"] == pytest.approx(0.77)
    assert got["balanced_accuracy"] == pytest.approx((50 / 60 + 20 / 30 + 7 / 10) / 3)
    assert got["macro_f1"] == pytest.approx((0.81967 + 0.71429 + 0.63636) / 3, abs=1e-4)
    # "Always a": recall 1 for a, 0 for the others; F1 of a is 2 x 0.6 / 1.6 = 0.75, over 3 classes.
    assert majority_scores([[50, 5, 5], [10, 20, 0], [2, 1, 7]]) == pytest.approx(
        {"accuracy": 0.6, "balanced_accuracy": 1 / 3, "macro_f1": 0.25}
    )
    # A class that never occurs is not averaged in; one only predicted is (its F1 is 0).
    assert scores([[3, 1, 0], [0, 4, 0], [0, 0, 0]])["macro_f1"] == pytest.approx((6 / 7 + 8 / 9) / 2)
    assert scores([[3, 0, 1], [0, 4, 0], [0, 0, 0]])["macro_f1"] == pytest.approx((6 / 7 + 1) / 3)


def test_a_skewed_split_cannot_flatter_a_model_on_the_gate_metrics():
    """Always predicting the 90% class passes an accuracy floor of 0.1 margin but neither metric that
    weighs the classes alike."""
    always_a = [[90, 0], [10, 0]]
    assert quality_floor(always_a, ["a", "b"], margin=0.0)["passed"] is True  # floor = baseline = 90%
    balanced = quality_floor(always_a, ["a", "b"], margin=0.2, metric="balanced_accuracy")
    assert balanced["baseline"] == pytest.approx(0.5) and balanced["floor"] == pytest.approx(0.6)
    assert balanced["test_value"] == pytest.approx(0.5) and balanced["passed"] is False
    assert describe(balanced) == (
        "test balanced accuracy 50.00% is below the quality floor 60.00% (majority class 'a' alone scores "
        "balanced accuracy 50.00%; gate_metric=balanced_accuracy, quality_margin=0.2)"
    )
    good = [[85, 5], [2, 8]]  # finds most of the rare class
    for metric in ("macro_f1", "balanced_accuracy"):
        assert quality_floor(good, ["a", "b"], margin=0.2, metric=metric)["passed"] is True, metric


def test_a_forced_champion_night_competes_with_the_champion_it_replaced(tmp_path):
    store = ModelStore(run_paths(str(tmp_path), "text", "2026-11-25"))
    for version in ("2026-11-22", "2026-11-23"):
        store.fs.create_dir(store.version_path(version), recursive=True)
        mark_published(store.fs, store.version_path(version))
    assert store.champion_before("2026-11-25") is None
    store.set_champion("2026-11-22", 0.8, "text-2026-11-22")
    store.set_champion("2026-11-23", 0.85, "text-2026-11-23")
    store.set_champion("2026-11-25", 0.9, "text-2026-11-25")
    assert store.champion_before("2026-11-24") == store.champion()  # another night: the champion itself
    assert store.champion_before("2026-11-25") == {"version": "2026-11-23", "test_accuracy": 0.85}
    store.fs.delete_dir(store.version_path("2026-11-23"))  # gone from the store: the one before it
    assert store.champion_before("2026-11-25") == {"version": "2026-11-22", "test_accuracy": 0.8}


def test_a_loss_that_turns_nan_ends_the_fit_in_one_line_and_publishes_nothing(
    ray_cluster, demo_root, tmp_path
):
    from conftest import config_for

    from dlbatch.errors import TrainingError
    from dlbatch.flow import run_train

    cfg = config_for(tmp_path, "text", demo_root, "text.train.lr=1e30", "text.train.epochs=2")
    with pytest.raises(TrainingError) as err:
        run_train(cfg)
    message = str(err.value)
    assert re.fullmatch(
        r"text: training diverged in epoch 1/2 \(train loss (nan|inf), val loss \S+\); nothing published; "
        r"lower text\.train\.lr \(now 1e\+30\) and rerun with force=true",
        message,
    ), message
    assert not (tmp_path / "runs" / "2026-11-25" / "text" / "model").exists()
    assert not list((tmp_path / "ray_results" / "text-2026-11-25").glob("checkpoint_*"))


def test_a_long_stage_logs_a_line_every_interval_with_what_it_has_done(caplog):
    import logging
    import time

    from dlbatch.progress import heartbeat

    done = {"rows": 0}
    with (
        caplog.at_level(logging.INFO, logger="dlbatch"),
        heartbeat("text: scoring", 0.2, lambda: f"{done['rows']} rows"),
    ):
        for _ in range(8):
            time.sleep(0.15)
            done["rows"] += 100
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 3 and all(
        re.fullmatch(r"text: scoring: running for \d+s, \d+ rows", line) for line in lines
    )
    counts = [int(line.split(", ")[1].split()[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] > counts[0]  # the lines follow the work
