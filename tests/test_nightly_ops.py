"""Nights in a row: a model below the quality floor is never promoted (and the night fails), a good one is,
force=true redoes a night in the model store too, scoring keeps to the champion, and a trigger that fires
twice does the work once."""

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_night import assert_summary_keys

from dlbatch.checkpoint import MODEL_FILE
from dlbatch.config import load_config
from dlbatch.errors import DlbatchError, QualityError
from dlbatch.flow import run_nightly, run_predict


def _night_cfg(out, paths, date, *extra):
    data = [f"text.data.{s}={p}" for s, p in paths.items()]
    return load_config(
        None,
        [
            "tasks=[text]",
            f"output_root={out}",
            f"run_date={date}",
            "text.train.batch_size=32",
            "promotion_tolerance=0.05",
            "keep_checkpoint_runs=2",
            *data,
            *extra,
        ],
    )


def _model_versions(run_dir):
    preds = pads.dataset(run_dir / "predictions", format="parquet").to_table(columns=["model_version"])
    return set(preds["model_version"].to_pylist())


def _scrambled(tmp_path, train_dir):
    """The training split with its labels permuted: a model of it can learn the class prior at most."""
    table = pq.read_table(train_dir)
    shuffled = np.random.default_rng(0).permutation(table["label"].to_pylist())
    out = tmp_path / "scrambled-train"
    if not out.exists():
        out.mkdir()
        pq.write_table(
            table.set_column(table.schema.get_field_index("label"), "label", pa.array(shuffled)),
            out / "p.parquet",
        )
    return {"train": str(out)}


def _below_floor(cfg) -> dict:
    with pytest.raises(QualityError) as err:
        run_nightly(cfg)
    [summary] = err.value.summaries
    assert summary["verdict"]["status"] == "below_floor"
    assert str(err.value) == f"text: {summary['verdict']['reason']}"
    return summary


def _champion(out) -> str | None:
    path = out / "models/text/champion.json"
    return json.loads(path.read_text())["version"] if path.exists() else None


def _weights(model_dir) -> bytes:
    return (model_dir / MODEL_FILE).read_bytes()


def test_nights_quality_floor_promotion_gate_force_mlflow_and_idempotent_trigger(
    ray_cluster, demo_root, tmp_path, mlflow_server
):
    """Every night is also tracked in a real MLflow server (runs, metrics, artifacts, a model version per
    night, the champion alias). A forced night below the floor on the champion's own date, and a tracking
    server that is down, are tested without a night: tests/test_gate.py, tests/test_tracking.py."""
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    mlflow = MlflowClient(uri)
    out = tmp_path / "out"
    good = demo_root["text"]
    bad = {**good, **_scrambled(tmp_path, good["train"])}
    night1_dir = out / "runs/2026-11-23/text"

    def _cfg(out, paths, date, *extra):
        return _night_cfg(out, paths, date, f"tracking.mlflow_uri={uri}", *extra)

    # Night 1 on scrambled labels, no champion yet: below the floor, nothing published, the job fails.
    night1 = _below_floor(_cfg(out, bad, "2026-11-23", "text.train.epochs=1"))
    quality = night1["metrics"]["quality"]
    assert quality["majority_accuracy"] >= 0.25 and quality["floor"] == pytest.approx(
        quality["majority_accuracy"] + 0.2 * (1 - quality["majority_accuracy"])
    )
    assert night1["test_accuracy"] < quality["floor"]
    assert night1["verdict"]["reason"].endswith("not promoted, no predictions published (no champion yet)")
    assert not (night1_dir / "predictions").exists() and _champion(out) is None
    report = (night1_dir / "report.html").read_text()
    assert report.index("id='verdict'") < report.index("test-accuracy")  # the verdict opens the report
    assert "Below the quality floor" in report
    # Scoring without --model never falls back to an unpromoted model.
    with pytest.raises(DlbatchError, match=r"text: no champion in .* yet \(jobs/nightly.py promotes one\)"):
        run_predict(_cfg(out, good, "2026-11-23"))
    # The night is decided: a retried trigger does not redo it and still fails; force=true redoes it.
    again = _below_floor(_cfg(out, bad, "2026-11-23", "text.train.epochs=1"))
    assert again["skipped"] is True
    [night1] = run_nightly(_cfg(out, good, "2026-11-23", "text.train.epochs=2", "force=true"))
    assert night1["verdict"]["status"] == "promoted" and night1["metrics"]["promotion"]["replaced_version"]
    assert night1["metrics"]["promotion"]["reason"] == "no champion yet"
    assert _model_versions(night1_dir) == {"text-2026-11-23"} and _champion(out) == "2026-11-23"
    # The store holds the forced night's model, not the first attempt's.
    assert _weights(out / "models/text/versions/2026-11-23") == _weights(night1_dir / "model")

    # Night 2 on scrambled labels with a champion in place: scored with the champion, the job still fails.
    night2 = _below_floor(_cfg(out, bad, "2026-11-24", "text.train.epochs=1"))
    assert night2["verdict"]["reason"].endswith("not promoted, scored with champion 2026-11-23")
    assert night2["metrics"]["promotion"]["champion_version"] == "2026-11-23"
    assert _model_versions(out / "runs/2026-11-24/text") == {"text-2026-11-23"}
    assert _champion(out) == "2026-11-23"
    assert night2["metrics"]["deleted_checkpoint_runs"] == []  # two run dates: both kept
    # MLflow: the rejected night is a version of its own; the alias stays on the forced night 1's.
    assert mlflow.get_model_version_by_alias("dlbatch-text", "champion").version == "2"

    # An older run that never published its model (killed, say): its checkpoints are what a rerun would
    # resume from, so retention leaves them alone.
    unfinished = out / "ray_results" / "text-2026-11-20" / "checkpoint_2026-11-20_00-00-00.000000"
    unfinished.mkdir(parents=True)

    # Night 3, triggered twice: the second trigger finds the finished run and does nothing.
    [night3] = run_nightly(_cfg(out, good, "2026-11-25", "text.train.epochs=2"))
    # keep_checkpoint_runs=2: night 1's checkpoints go (its model is published), nights 2 and 3 stay.
    assert night3["metrics"]["deleted_checkpoint_runs"] == ["text-2026-11-23"]
    assert sorted(p.name for p in (out / "ray_results").iterdir() if p.name.startswith("text-")) == [
        "text-2026-11-20",
        "text-2026-11-24",
        "text-2026-11-25",
    ]
    assert unfinished.is_dir()
    assert (night1_dir / "model/_SUCCESS").exists()  # the published model is untouched
    [again] = run_nightly(_cfg(out, good, "2026-11-25", "text.train.epochs=2"))
    assert again["skipped"] is True and again["run_id"] == night3["run_id"]
    assert again["durations_s"] == night3["durations_s"]
    ckpts = [p for p in (out / "ray_results" / "text-2026-11-25").glob("checkpoint_*") if p.is_dir()]
    assert len(ckpts) == 2  # trained once: one checkpoint per epoch
    decision = night3["metrics"]["promotion"]
    assert decision["promoted"] and decision["previous_version"] == "2026-11-23"
    assert 0.5 < decision["previous_accuracy_same_test"] <= 1  # the champion re-measured on night 3's test
    assert _champion(out) == "2026-11-25"
    assert sorted(p.name for p in (out / "models/text/versions").iterdir()) == [
        "2026-11-23",
        "2026-11-24",
        "2026-11-25",
    ]
    report = (out / "runs/2026-11-25/text/report.html").read_text()
    assert "previous night text-2026-11-24" in report and "data:image/svg+xml;base64," in report
    # A normal demo night after another (night 2's scrambled labels keep their distribution): no drift,
    # against the previous night or the champion's training data, on any split.
    drift = night3["drift"]
    assert set(drift["references"]) == {"previous", "champion_train"}
    assert set(drift["distances"]) == {"train", "val", "test", "score"} and drift["drifted"] == []
    assert "Input profile and drift" in report
    assert night3["versions"]["ray"].startswith("2.60") and night3["config"]["train"]["epochs"] == 2
    assert_summary_keys(night3)  # summary.json keeps every key it has carried (tests/test_night.py)

    # MLflow has every night that ran: its run (params, per-epoch metrics, summary, report, model) and a
    # model version, with the champion alias on the promoted one.
    [experiment] = [mlflow.get_experiment_by_name("dlbatch")]
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in runs] == ["text-2026-11-23"] * 2 + ["text-2026-11-24", "text-2026-11-25"]
    assert [r.data.tags["dlbatch.verdict"] for r in runs] == [
        "below_floor",
        "promoted",
        "below_floor",
        "promoted",
    ]
    last = runs[-1].info.run_id
    assert runs[-1].data.params["train.epochs"] == "2" and runs[-1].data.params["train.batch_size"] == "32"
    assert runs[-1].data.tags["dlbatch.version.ray"] == night3["versions"]["ray"]
    history = mlflow.get_metric_history(last, "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    assert {m.step: m.value for m in history}[1] == pytest.approx(night3["history"][1]["val_accuracy"])
    rates = {m.step: m.value for m in mlflow.get_metric_history(last, "lr")}  # the schedule, per epoch
    assert rates == pytest.approx({h["epoch"]: h["lr"] for h in night3["history"]}) and rates[1] < rates[0]
    assert mlflow.get_metric_history(last, "test_accuracy")[0].value == pytest.approx(night3["test_accuracy"])
    for key in ("test_macro_f1", "test_balanced_accuracy"):
        assert mlflow.get_metric_history(last, key)[0].value == pytest.approx(night3["metrics"][key]), key
    assert {a.path for a in mlflow.list_artifacts(last)} >= {"summary.json", "report.html", "model"}
    assert f"model/{MODEL_FILE}" in {a.path for a in mlflow.list_artifacts(last, "model")}
    versions = sorted(mlflow.search_model_versions("name='dlbatch-text'"), key=lambda v: int(v.version))
    assert [v.tags["dlbatch.run_date"] for v in versions] == ["2026-11-23"] * 2 + ["2026-11-24", "2026-11-25"]
    assert mlflow.get_model_version_by_alias("dlbatch-text", "champion").version == versions[-1].version

    # jobs/predict.py without --model scores with the champion; with --model, with that model.
    [scored] = run_predict(_cfg(out, good, "2026-11-26"))
    assert _model_versions(out / "runs/2026-11-26/text") == {"text-2026-11-25"}
    named = str(out / "runs/2026-11-25/text/model")
    run_predict(_cfg(out, good, "2026-11-27"), model=named)
    assert _model_versions(out / "runs/2026-11-27/text") == {named}


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is missing: .ci/run installs it (Debian package 'chromium')"
    return path


def _browser(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome-profile'}"]  # fmt: skip
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_headless_browser(tmp_path):
    from dlbatch.report import per_class_scores, render_report

    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_accuracy": 0.5 + 0.1 * e,
                "samples_per_s": 1000 + e, "epoch_s": 2.0} for e in range(3)]  # fmt: skip
    summary = {
        "task": "text", "run_id": "text-2026-11-25", "test_accuracy": 0.8765, "history": history,
        "metrics": {"confusion": [[40, 10], [5, 45]], "label_names": ["news", "体育"], "test_macro_f1": 0.8496,
                    "test_balanced_accuracy": 0.85,
                    "promotion": {"promoted": False, "reason": "kept champion 2026-11-23: test accuracy lower",
                                  "champion_version": "2026-11-23"}},
        "rows": {"train": {"read": 100, "used": 98, "rejected": 2}, "score": {"read": 50, "used": 50, "rejected": 0}},
        "durations_s": {"preprocess": 1.0, "train": 30.0, "predict": 2.0},
        "profile": {"score": {"rows": 50, "labels": {"news": 30, "体育": 20}, "unknown": 0.61}},
        "drift": {"threshold": 0.2, "action": "warn", "references": {"previous": "the previous night"},
                  "reference_profiles": {"previous": {"score": {"rows": 60, "labels": {"news": 30, "体育": 30},
                                                                "unknown": 0.02}}},
                  "distances": {"score": {"labels": {"previous": 0.1}, "unknown": {"previous": 0.59}}},
                  "drifted": [{"split": "score", "feature": "unknown", "against": "previous", "distance": 0.59}]},
    }  # fmt: skip
    previous = {"run_id": "text-2026-11-24", "test_accuracy": 0.9}
    page = tmp_path / "report.html"
    page.write_text(render_report(summary, previous))

    dom = _browser(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "87.65%" in dom.stdout and "90.00%" in dom.stdout and "-2.35 points" in dom.stdout
    assert "kept champion 2026-11-23" in dom.stdout
    assert re.search(r"macro-F1 <b id=\"macro-f1\">84.96%</b>, balanced accuracy <b[^>]*>85.00%<", dom.stdout)
    # The profile beside the previous night's, one distance per feature, the drifted one marked.
    assert "news 60%, 体育 40%" in dom.stdout and "news 50%, 体育 50%" in dom.stdout
    assert ">0.59<" not in dom.stdout and ">0.590 (drifted)<" in dom.stdout and ">0.100<" in dom.stdout
    images = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', dom.stdout)
    assert len(images) == 2  # curves + confusion matrix, embedded: the page needs nothing else
    curves, confusion = (base64.b64decode(data).decode() for data in images)
    assert float(re.search(r'<svg[^>]* width="([0-9.]+)pt"', curves).group(1)) > 200
    # Text stays text, drawn by the browser in any script (a PNG showed empty boxes for Chinese labels).
    assert ">val accuracy</text>" in curves and ">体育</text>" in confusion and ">news</text>" in confusion
    # Per-class scores, known from the confusion matrix: news p=40/45, r=40/50, F1=0.842; sport p=45/55,
    # r=45/50, F1=0.857.
    assert ">0.889<" in dom.stdout and ">0.800<" in dom.stdout and ">0.842<" in dom.stdout
    assert ">0.818<" in dom.stdout and ">0.900<" in dom.stdout and ">0.857<" in dom.stdout
    assert [round(s["f1"], 3) for s in per_class_scores(summary["metrics"]["confusion"])] == [0.842, 0.857]

    shot = tmp_path / "report.png"
    done = _browser(tmp_path, f"--screenshot={shot}", "--window-size=1000,1800", page.as_uri())
    assert done.returncode == 0 and shot.exists()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page
