"""Three nights: a model is promoted, a worse one is not (scoring keeps the champion), and a trigger that
fires twice does the work once."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from dlbatch.config import load_config
from dlbatch.runner import run_nightly


def _cfg(out, paths, date, *extra):
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

    assert night2["metrics"]["deleted_checkpoint_runs"] == []  # two run dates: both kept

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
    assert (out / "runs/2026-11-23/text/model/_SUCCESS").exists()  # the published model is untouched
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
    report = (out / "runs/2026-11-25/text/report.html").read_text()
    assert "previous night text-2026-11-24" in report and "data:image/png;base64," in report
    assert night3["versions"]["ray"].startswith("2.60") and night3["config"]["train"]["epochs"] == 2


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
        "metrics": {"confusion": [[40, 10], [5, 45]], "label_names": ["news", "sport"],
                    "promotion": {"promoted": False, "reason": "kept champion 2026-11-23: test accuracy lower",
                                  "champion_version": "2026-11-23"}},
        "rows": {"train": {"read": 100, "used": 98, "rejected": 2}, "score": {"read": 50, "used": 50, "rejected": 0}},
        "durations_s": {"preprocess": 1.0, "train": 30.0, "predict": 2.0},
    }  # fmt: skip
    previous = {"run_id": "text-2026-11-24", "test_accuracy": 0.9}
    page = tmp_path / "report.html"
    page.write_text(render_report(summary, previous))

    dom = _browser(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "87.65%" in dom.stdout and "90.00%" in dom.stdout and "-2.35 points" in dom.stdout
    assert "kept champion 2026-11-23" in dom.stdout
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom.stdout)
    assert len(images) == 2  # curves + confusion matrix, embedded: the page needs nothing else
    for data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 200
    f1 = per_class_scores(summary["metrics"]["confusion"])[0]["f1"]
    assert f"{f1:.3f}" in dom.stdout  # per-class F1 shown (news: p=40/45, r=40/50)

    shot = tmp_path / "report.png"
    done = _browser(tmp_path, f"--screenshot={shot}", "--window-size=1000,1800", page.as_uri())
    assert done.returncode == 0 and shot.exists()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page
