"""Every branch of the night's decisions, without Ray: the quality floor, drift (warn and block), the
promotion gate, the verdicts and the job's failure; and the model store's side of a forced night."""

from __future__ import annotations

import json
import logging

import pytest

from dlbatch import gate
from dlbatch.config import DriftConfig, JobConfig, load_config
from dlbatch.context import RunContext
from dlbatch.publish import apply_promotion, store_candidate
from dlbatch.quality import quality_floor
from dlbatch.registry import ModelStore
from dlbatch.store import mark_published

LABELS = {"a": 50, "b": 50}
REFERENCES = {
    "previous": ("the previous night (text-2026-11-24)", {"train": {"rows": 100, "labels": LABELS}}),
    "champion_train": ("champion text-2026-11-23's training data", {"*": {"rows": 100, "labels": LABELS}}),
}
WARN, BLOCK = DriftConfig(action="warn"), DriftConfig(action="block")
RIVAL = ("2026-11-23", 0.88)


def _job(tolerance: float, metric: str = "accuracy") -> JobConfig:
    return JobConfig(promotion_tolerance=tolerance, gate_metric=metric)


def _profile(a: int, b: int) -> dict:
    return {"rows": a + b, "labels": {"a": a, "b": b}}


def test_the_floor_passes_a_model_above_it_and_names_the_baselines_below_it():
    good = quality_floor([[40, 10], [10, 40]], ["a", "b"], margin=0.2)
    assert gate.floor_failure(good) is None
    bad = quality_floor([[50, 0], [50, 0]], ["a", "b"], margin=0.2)
    assert gate.floor_failure(bad).startswith("test accuracy 50.00% is below the quality floor 60.00%")


def test_drift_is_measured_against_every_reference_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="dlbatch"):
        same = gate.check_drift(
            {"train": _profile(52, 48), "test": _profile(50, 50)}, REFERENCES, "text", WARN
        )
    assert same.drifted == [] and not same.blocked and not caplog.records
    assert set(same.distances) == {"train", "test"}
    assert same.distances["train"]["labels"] == {"previous": 0.02, "champion_train": 0.02}
    assert "previous" not in same.distances["test"]["labels"]  # the previous night kept no test profile

    with caplog.at_level(logging.WARNING, logger="dlbatch"):
        warned = gate.check_drift({"train": _profile(90, 10)}, REFERENCES, "text", WARN)
    assert {d["against"] for d in warned.drifted} == {"previous", "champion_train"}
    assert not warned.blocked and gate.drift_block(warned) is None
    assert (
        caplog.records[-1].getMessage().startswith("text: input drift above 0.2: train labels (0.40 against")
    )
    blocked = gate.check_drift({"train": _profile(90, 10)}, REFERENCES, "text", BLOCK)
    assert blocked.blocked and gate.drift_block(blocked).endswith("(drift.action=block)")
    assert gate.drift_block(None) is None


def test_a_later_drift_check_adds_its_splits():
    fit = gate.check_drift({"train": _profile(50, 50)}, REFERENCES, "text", BLOCK)
    score = gate.check_drift({"score": _profile(95, 5)}, REFERENCES, "text", BLOCK)
    both = fit.plus(score)
    assert set(both.distances) == {"train", "score"} and both.blocked and not fit.blocked
    assert [(d["split"], d["against"]) for d in both.drifted] == [("score", "champion_train")]
    assert fit.plus(None) is fit


def test_the_promotion_gate():
    first = gate.decide_promotion(("2026-11-23", 0.5), None, _job(0.05), None)
    assert first.promoted and first.champion_version == "2026-11-23" and first.reason == "no champion yet"
    close = gate.decide_promotion(("2026-11-24", 0.84), RIVAL, _job(0.05), None)
    assert close.promoted and close.champion_version == "2026-11-24"
    assert close.reason == "test accuracy 84.00% >= champion 2026-11-23's 88.00% - tolerance 5.00%"
    kept = gate.decide_promotion(("2026-11-24", 0.80), RIVAL, _job(0.05), None)
    assert not kept.promoted and kept.champion_version == "2026-11-23"
    assert kept.reason == (
        "kept champion 2026-11-23: test accuracy 80.00% < its 88.00% - tolerance 5.00% on the same test data"
    )
    blocked = gate.decide_promotion(("2026-11-24", 0.99), ("2026-11-23", None), _job(0.05), "below the floor")
    assert (
        not blocked.promoted
        and blocked.champion_version == "2026-11-23"
        and blocked.reason == "below the floor"
    )
    alone = gate.decide_promotion(("2026-11-23", 0.99), None, _job(0.05), "below the floor")
    assert not alone.promoted and alone.champion_version is None


def test_the_gate_compares_the_configured_metric():
    kept = gate.decide_promotion(("2026-11-24", 0.70), ("2026-11-23", 0.80), _job(0.05, "macro_f1"), None)
    assert not kept.promoted and kept.metric == "macro_f1"
    assert kept.reason == (
        "kept champion 2026-11-23: test macro-F1 70.00% < its 80.00% - tolerance 5.00% on the same test data"
    )
    close = gate.decide_promotion(
        ("2026-11-24", 0.76), ("2026-11-23", 0.80), _job(0.05, "balanced_accuracy"), None
    )
    assert close.promoted and close.reason.startswith(
        "test balanced accuracy 76.00% >= champion 2026-11-23's"
    )
    assert gate.decide_promotion(("2026-11-24", 0.9), None, _job(0.05), None).metric == "accuracy"


def test_nightly_verdicts():
    promoted = gate.decide_promotion(("2026-11-24", 0.9), RIVAL, _job(0.05), None)
    kept = gate.decide_promotion(("2026-11-24", 0.5), RIVAL, _job(0.05), None)
    no_drift = gate.check_drift({"train": _profile(50, 50)}, REFERENCES, "text", WARN)
    assert gate.nightly_verdict(gate.Blocks(), no_drift, promoted, None) == gate.Verdict(
        "promoted", f"promoted: {promoted.reason}"
    )
    assert gate.nightly_verdict(gate.Blocks(), None, kept, None) == gate.Verdict("kept_champion", kept.reason)

    floor = "test accuracy 20.00% is below the quality floor 60.00%"
    below = gate.decide_promotion(("2026-11-24", 0.2), ("2026-11-23", None), _job(0.05), floor)
    verdict = gate.nightly_verdict(gate.Blocks(floor=floor), None, below, None)
    assert verdict.status == "below_floor"
    assert verdict.reason == f"{floor}; not promoted, scored with champion 2026-11-23"
    first = gate.decide_promotion(("2026-11-23", 0.2), None, _job(0.05), floor)
    assert gate.nightly_verdict(gate.Blocks(floor=floor), None, first, None).reason.endswith(
        "not promoted, no predictions published (no champion yet)"
    )

    warned = gate.check_drift({"train": _profile(90, 10)}, REFERENCES, "text", WARN)
    verdict = gate.nightly_verdict(gate.Blocks(), warned, promoted, None)
    assert verdict.status == "drifted" and verdict.reason.endswith(
        "; promoted, scored with champion 2026-11-24 (drift.action=warn: nothing withheld)"
    )
    assert gate.nightly_verdict(gate.Blocks(), warned, kept, None).reason.endswith(
        f"; not promoted ({kept.reason}), scored with champion 2026-11-23 (drift.action=warn: nothing withheld)"
    )

    blocked = gate.check_drift({"train": _profile(90, 10)}, REFERENCES, "text", BLOCK)
    why = gate.drift_block(blocked)
    refused = gate.decide_promotion(("2026-11-24", 0.9), ("2026-11-23", None), _job(0.05), why)
    verdict = gate.nightly_verdict(gate.Blocks(drift=why), blocked, refused, None)
    assert verdict.status == "drifted"
    assert verdict.reason.endswith("; not promoted, scored with champion 2026-11-23 (drift.action=block)")
    score = gate.check_drift({"score": _profile(95, 5)}, REFERENCES, "text", BLOCK)
    verdict = gate.nightly_verdict(gate.Blocks(), no_drift.plus(score), promoted, gate.drift_block(score))
    assert verdict.reason.endswith("; promoted, predictions withheld (drift.action=block)")


def test_train_job_verdicts():
    assert gate.train_verdict(None, None, 0.87) == gate.Verdict(
        "trained", "test accuracy 87.00%; not promoted by this job (jobs/nightly.py promotes)"
    )
    assert gate.train_verdict("below", None, 0.1) == gate.Verdict("below_floor", "below")
    drifted = gate.check_drift({"train": _profile(90, 10)}, REFERENCES, "text", WARN)
    verdict = gate.train_verdict(None, drifted, 0.9)
    assert verdict.status == "drifted" and verdict.reason.endswith(
        "; not promoted by this job (jobs/nightly.py promotes)"
    )


def test_the_job_fails_for_a_night_below_the_floor_or_blocked_by_drift():
    ok = {"task": "image", "verdict": {"status": "promoted", "reason": "promoted"}, "drift": None}
    below = {"task": "text", "verdict": {"status": "below_floor", "reason": "too low"}, "drift": None}
    blocked = {
        "task": "text",
        "verdict": {"status": "drifted", "reason": "drifted"},
        "drift": {"blocked": True},
    }
    warned = {
        "task": "text",
        "verdict": {"status": "drifted", "reason": "drifted"},
        "drift": {"blocked": False},
    }
    assert gate.job_failure([ok, warned]) is None
    assert gate.job_failure([ok, below]) == "text: too low"
    assert gate.job_failure([blocked, below]) == "text: drifted; text: too low"


def _forced_night(tmp_path, champions: list[tuple[str, float]]):
    """A forced rerun of 2026-11-25, the champion's own night, whose new model is below the floor."""
    cfg = load_config(None, [f"output_root={tmp_path}", "run_date=2026-11-25", "tasks=[text]", "force=true"])
    ctx = RunContext(cfg, "text", "nightly")
    store = ModelStore(ctx.paths)
    for version, accuracy in champions:
        store.fs.create_dir(store.version_path(version), recursive=True)
        mark_published(store.fs, store.version_path(version))
        store.set_champion(version, accuracy, f"text-{version}")
    model = tmp_path / "runs/2026-11-25/text/model"
    model.mkdir(parents=True)
    (model / "model.pt").write_bytes(b"tonight's weights")
    mark_published(store.fs, str(model))
    return ctx, store


@pytest.mark.parametrize("earlier", [True, False])
def test_a_forced_night_below_the_floor_gives_the_title_back(tmp_path, earlier):
    """A blocked model's rival is not re-measured (no Ray here). With an earlier champion it is champion
    again; without one there is no champion at all."""
    champions = [("2026-11-22", 0.8), ("2026-11-25", 0.9)] if earlier else [("2026-11-25", 0.9)]
    ctx, store = _forced_night(tmp_path, champions)
    candidate = store_candidate(ctx)
    assert candidate.was_champion and candidate.replaced
    assert candidate.rival == ({"version": "2026-11-22", "test_accuracy": 0.8} if earlier else None)
    rival = (candidate.rival["version"], None) if earlier else None
    decision = gate.decide_promotion((candidate.version, 0.1), rival, _job(0.01), "below the floor")
    promotion = apply_promotion(ctx, candidate, decision, 0.1)
    assert promotion.replaced_version and not promotion.decision.promoted
    assert (tmp_path / "models/text/versions/2026-11-25/model.pt").read_bytes() == b"tonight's weights"
    if earlier:
        assert store.champion()["version"] == "2026-11-22"
        assert promotion.champion.version == "text-2026-11-22"
        assert promotion.champion.uri == store.version_uri("2026-11-22")
    else:
        assert store.champion() is None and promotion.champion is None
        assert not (tmp_path / "models/text/champion.json").exists()
    history = json.loads((tmp_path / "models/text/champion.json").read_text())["history"] if earlier else []
    assert [h["version"] for h in history] == (["2026-11-22", "2026-11-25", "2026-11-22"] if earlier else [])


def test_data_warnings_say_what_the_input_size_does_to_the_training_data():
    image = load_config(None, []).image  # 28x28 grey by default
    photos = {"rows": 10, "sizes": {"375x500": 6, "333x500": 3, "28x28": 1}, "modes": {"RGB": 9, "L": 1}}
    assert gate.data_warnings(image, photos) == [
        "image: training images are 375x500 (median) and are resized 17.9x to 28x28; set image.image.height "
        "and image.image.width to keep their detail",
        "image: 90% of training images are in colour and are converted to grey (image.image.channels=1); "
        "set image.image.channels=3 to keep their colour",
    ]
    colour64 = load_config(
        None, ["image.image.height=64", "image.image.width=64", "image.image.channels=3"]
    ).image
    assert gate.data_warnings(colour64, {"rows": 4, "sizes": {"100x120": 4}, "modes": {"RGB": 4}}) == []
    digits = {"rows": 4, "sizes": {"28x28": 3, "56x56": 1}, "modes": {"L": 4}}  # 2x or less: no word
    assert gate.data_warnings(image, digits) == []

    text = load_config(None, []).text
    assert gate.data_warnings(text, {"rows": 10, "cut": 0.7}) == [
        "text: 70% of training texts are longer than 64 tokens and are cut there; raise text.text.max_length "
        "to keep more of them"
    ]
    assert gate.data_warnings(text, {"rows": 10, "cut": 0.5}) == []
    assert gate.data_warnings(text, None) == []  # profiling off: nothing measured, nothing said
