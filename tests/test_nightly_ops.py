"""Three nights: a model is promoted, a worse one is not (scoring keeps the champion), and a trigger that
fires twice does the work once."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dlbatch.config import load_config
from dlbatch.runner import run_nightly


def _cfg(out, paths, date, *extra):
    data = [f"text.data.{s}={p}" for s, p in paths.items()]
    return load_config(
        None,
        ["tasks=[text]", f"output_root={out}", f"run_date={date}", "text.train.batch_size=32", *data, *extra],
    )


def _model_versions(run_dir):
    preds = pads.dataset(run_dir / "predictions", format="parquet").to_table(columns=["model_version"])
    return set(preds["model_version"].to_pylist())


def test_three_nights_promotion_gate_and_idempotent_trigger(ray_cluster, demo_root, tmp_path):
    out = tmp_path / "out"
    good = demo_root["text"]

    [night1] = run_nightly(_cfg(out, good, "2026-11-23", "text.train.epochs=2"))
    assert (
        night1["metrics"]["promotion"]["promoted"]
        and night1["metrics"]["promotion"]["reason"] == "no champion yet"
    )
    assert _model_versions(out / "runs/2026-11-23/text") == {"text-2026-11-23"}

    # Night 2: one epoch on shuffled labels, a deliberately worse model.
    table = pq.read_table(good["train"])
    shuffled = np.random.default_rng(0).permutation(table["label"].to_pylist())
    bad_train = tmp_path / "bad-train"
    bad_train.mkdir()
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", pa.array(shuffled)),
        bad_train / "p.parquet",
    )
    [night2] = run_nightly(_cfg(out, {**good, "train": str(bad_train)}, "2026-11-24", "text.train.epochs=1"))
    decision = night2["metrics"]["promotion"]
    assert not decision["promoted"]
    assert decision["champion_version"] == "2026-11-23"
    assert decision["reason"].startswith("kept champion 2026-11-23: test accuracy")
    assert decision["previous_accuracy_same_test"] > decision["candidate_accuracy"] + 0.2
    assert _model_versions(out / "runs/2026-11-24/text") == {"text-2026-11-23"}  # scored by the champion
    champion = json.loads((out / "models/text/champion.json").read_text())
    assert champion["version"] == "2026-11-23"

    # Night 3, triggered twice: the second trigger finds the finished run and does nothing.
    [night3] = run_nightly(_cfg(out, good, "2026-11-25", "text.train.epochs=2"))
    [again] = run_nightly(_cfg(out, good, "2026-11-25", "text.train.epochs=2"))
    assert again["skipped"] is True and again["run_id"] == night3["run_id"]
    assert again["durations_s"] == night3["durations_s"]
    ckpts = [p for p in (out / "ray_results" / "text-2026-11-25").glob("checkpoint_*") if p.is_dir()]
    assert len(ckpts) == 2  # trained once: one checkpoint per epoch
    assert night3["metrics"]["promotion"]["promoted"]
    assert json.loads((out / "models/text/champion.json").read_text())["version"] == "2026-11-25"
    assert sorted(p.name for p in (out / "models/text/versions").iterdir()) == [
        "2026-11-23",
        "2026-11-24",
        "2026-11-25",
    ]
    assert night3["versions"]["ray"].startswith("2.60") and night3["config"]["train"]["epochs"] == 2
