"""The quality floor's numbers and the promotion gate's decisions, on known inputs (no Ray needed)."""

from __future__ import annotations

import re

import pytest

from dlbatch.quality import describe, quality_floor
from dlbatch.registry import ModelStore
from dlbatch.store import mark_published, run_paths


def test_the_floor_is_above_the_majority_baseline_by_a_share_of_its_errors():
    # Test split: 60 / 30 / 10 rows. Majority baseline 60%; floor 60% + 0.2 x 40% = 68%.
    confusion = [[50, 5, 5], [10, 20, 0], [2, 1, 7]]
    q = quality_floor(confusion, ["a", "b", "c"], accuracy=0.77, margin=0.2)
    assert q["majority_class"] == "a"
    assert q["majority_accuracy"] == pytest.approx(0.60)
    assert q["chance_accuracy"] == pytest.approx(1 / 3)
    assert q["floor"] == pytest.approx(0.68)
    assert q["passed"] is True
    assert quality_floor(confusion, ["a", "b", "c"], accuracy=0.67, margin=0.2)["passed"] is False
    # Skewed classes: "always a" scores 90% and does not pass a floor of 92%.
    skewed = quality_floor([[90, 0], [10, 0]], ["a", "b"], accuracy=0.90, margin=0.2)
    assert skewed["floor"] == pytest.approx(0.92) and skewed["passed"] is False
    assert describe(skewed) == (
        "test accuracy 90.00% is below the quality floor 92.00% (majority class 'a' alone scores 90.00%, "
        "chance 50.00%; quality_margin=0.2)"
    )
    assert quality_floor([[0, 0], [0, 0]], ["a", "b"], accuracy=float("nan"), margin=0.2)["passed"] is False


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
