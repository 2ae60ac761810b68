"""End to end on a real local Ray cluster: train each model for 2 epochs on demo data, evaluate, predict."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import config_for, fresh_python

from dlbatch.checkpoint import load_model
from dlbatch.flow import run_nightly, run_predict, run_train
from dlbatch.models import build_model
from dlbatch.store import SUCCESS

REPO = Path(__file__).parents[1]


def _rows(path) -> int:
    return pads.dataset(path, format="parquet").count_rows()


def shipped_config(tmp_path, task: str, demo_root: dict, *extra: str):
    """``jobs/configs/<task>.yaml`` as shipped, with what this machine cannot give it overridden: local
    data and output, CPU training, fewer workers and epochs. Its GPU inference (an actor per GPU, decoding
    or tokenizing in a CPU stage in front) runs on the session cluster's logical GPUs, the model on CPU."""
    from dlbatch.config import load_config

    data = [f"{task}.data.{split}={path}" for split, path in demo_root[task].items()]
    small = [f"{task}.train.use_gpu=false", f"{task}.train.num_workers=2", f"{task}.train.epochs=2",
             f"{task}.train.batch_size=32", f"{task}.train.lr=0.003", f"{task}.predict.num_actors=1"]  # fmt: skip
    return load_config(
        REPO / "jobs" / "configs" / f"{task}.yaml",
        [f"output_root={tmp_path}", "run_date=2026-11-25", *data, *small, *extra],
    )


def assert_validation_is_one_ranks_over_the_whole_split(summary: dict, task: str, val_path: str) -> None:
    """The ranks' validation parts, summed, give what one process computes over the whole split with the
    same weights (the published checkpoint's, validated at the end of its epoch)."""
    import torch

    from dlbatch.config import task_config
    from dlbatch.predict import preprocess_spec
    from dlbatch.preprocess import preprocess_batch
    from dlbatch.train import DTYPES, FEATURES, eval_epoch

    model, meta = load_model(summary["paths"]["model"])
    cols = preprocess_batch(
        pq.read_table(val_path), preprocess_spec(task, task_config(task, meta["config"]), meta)
    )
    ok = np.asarray(cols["reject_reason"].is_null())
    batch = {k: torch.from_numpy(np.ascontiguousarray(cols[k][ok])).to(DTYPES[k]) for k in FEATURES[task]}
    loss, correct, rows = eval_epoch(model, [batch], task, torch.device("cpu"))
    validated = summary["history"][meta["epoch"]]
    assert validated["val_rows"] == rows
    assert validated["val_accuracy"] == pytest.approx(correct / rows, abs=1.5 / rows)  # a near-tie may flip
    assert validated["val_loss"] == pytest.approx(loss / rows, rel=1e-4)


@pytest.mark.parametrize(("task", "chance", "min_acc"), [("image", 0.10, 0.60), ("text", 0.25, 0.60)])
def test_shipped_config_trains_evaluates_and_predicts(
    ray_cluster, demo_root, tmp_path, task, chance, min_acc
):
    extra = ["text.data.passthrough_columns=[text]"] if task == "text" else []
    cfg = shipped_config(tmp_path, task, demo_root, *extra)
    assert cfg.task(task).predict.gpus_per_actor == 1
    [summary] = run_nightly(cfg)
    # The GPU layout: an actor pool holding a (logical) GPU each, decoding / tokenizing in CPU tasks.
    assert summary["metrics"]["predict"] == {
        "compute": "actors",
        "gpus_per_actor": 1.0,
        "preprocess": "tasks",
    }

    assert summary["test_accuracy"] > min_acc > chance
    score_rows = _rows(demo_root[task]["score"])
    assert summary["rows"]["score"] == {"read": score_rows, "used": score_rows, "rejected": 0}
    assert summary["rows"]["train"]["used"] == _rows(demo_root[task]["train"])
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    for h in summary["history"]:
        assert {"train_loss", "val_loss", "val_accuracy", "samples_per_s"} <= h.keys()
        assert h["val_rows"] == summary["rows"]["val"]["used"] == _rows(demo_root[task]["val"])
        assert h["val_ranks"] == 2  # both ranks validated a part of the split
    assert_validation_is_one_ranks_over_the_whole_split(summary, task, demo_root[task]["val"])
    assert 0 < summary["durations_s"]["train_first_batch"] < summary["durations_s"]["train"]

    run_dir = tmp_path / "runs" / "2026-11-25" / task
    assert json.loads((run_dir / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    pred_dir = run_dir / "predictions"
    assert (pred_dir / SUCCESS).exists()
    preds = pads.dataset(pred_dir, format="parquet").to_table()
    assert preds.num_rows == score_rows
    inputs = pq.read_table(demo_root[task]["score"], columns=["id"])
    assert sorted(preds["id"].to_pylist()) == sorted(inputs["id"].to_pylist())
    assert {"pred_index", "pred_label", "confidence", "probs", "model_version", "run_date"} <= set(
        preds.column_names
    )
    assert "reject_reason" not in preds.column_names
    if task == "text":  # pass-through columns come back with their rows
        by_id = dict(
            zip(
                *pq.read_table(demo_root[task]["score"], columns=["id", "text"]).to_pydict().values(),
                strict=True,
            )
        )
        assert all(
            by_id[i] == t for i, t in zip(preds["id"].to_pylist(), preds["text"].to_pylist(), strict=True)
        )
    first = preds.slice(0, 1).to_pylist()[0]
    assert abs(sum(first["probs"]) - 1) < 1e-4 and first["confidence"] == max(first["probs"])
    assert first["run_date"] == "2026-11-25"

    # The checkpoint carries what inference needs: weights, optimizer, label map, tokenizer, config.
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert {"model_args", "label_names", "config", "epoch"} <= meta.keys()
    assert (run_dir / "model" / "optimizer.pt").exists()
    if task == "text":
        assert meta["label_names"] == ["business", "health", "science", "sports"]
        tokenizer = (run_dir / "model" / "tokenizer.json").read_text()
        assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer.encode()).hexdigest()
        assert 2 < meta["model_args"]["vocab_size"] <= 10_000

    # A second scoring run for the same date is a no-op: still exactly one row per input.
    [again] = run_predict(cfg)
    assert _rows(pred_dir) == score_rows
    assert "predict" not in again["durations_s"]

    # Forced, in the CPU layout (Ray tasks decode or tokenize and run the model): the same predictions as
    # the GPU layout's, pass-through columns included.
    pool = [f"{task}.predict.compute=tasks", f"{task}.predict.gpus_per_actor=0", "force=true"]
    [pooled] = run_predict(config_for(tmp_path, task, demo_root, *extra, *pool))
    assert pooled["rows"]["score"] == summary["rows"]["score"]
    again = pads.dataset(pred_dir, format="parquet").to_table()
    key = [("id", "ascending")]
    before, after = preds.sort_by(key), again.select(preds.column_names).sort_by(key)
    assert before.drop(["probs", "confidence"]).equals(after.drop(["probs", "confidence"]))
    assert np.allclose(before["confidence"].to_numpy(), after["confidence"].to_numpy(), atol=1e-5)


def test_a_compiled_fit_trains_and_checkpoints_the_plain_model(ray_cluster, demo_root, tmp_path):
    """``train.compile``: the compiled steps train (losses fall, accuracy far above chance), and the
    checkpoint holds the plain model's weights (no wrapper's prefix), which inference loads. Compiled
    kernels add in another order, so a compiled fit does not match an eager one bit for bit (3-15% apart
    in loss after two epochs when compared side by side); its learning is what is checked here."""
    # A constant 3e-3 (the recipe's warm-up and decay are not what this tests): two epochs learn the digits.
    settings = ("image.train.epochs=2", "image.train.num_workers=1", "image.train.compile=true",
                "image.train.lr=0.003", "image.train.decay=constant", "image.train.warmup_fraction=0")  # fmt: skip
    [compiled] = run_train(config_for(tmp_path / "compiled", "image", demo_root, *settings))
    losses = [h["train_loss"] for h in compiled["history"]]
    assert losses[1] < losses[0] < 2.3  # below the 10-class chance loss (ln 10) from the first epoch
    assert compiled["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    model, meta = load_model(compiled["paths"]["model"])
    assert model.state_dict().keys() == build_model("image", meta["model_args"]).state_dict().keys()


def test_a_compile_that_fails_on_the_workers_ends_the_job_in_one_line(demo_root, tmp_path):
    """A worker without a working C++ compiler (torch.compile's CPU kernels need one; ``CXX`` names none, and
    a fresh inductor cache holds nothing compiled earlier) cannot compile: the job, on its own local Ray,
    ends with one line that names the setting, after no retries (``max_failures=0``)."""
    data = [f"image.data.{split}={path}" for split, path in demo_root["image"].items() if split != "score"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CXX="/nonexistent/c++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(
        [sys.executable, "jobs/train.py", "tasks=[image]", *data, f"output_root={tmp_path / 'out'}",
         "image.train.compile=true", "image.train.epochs=1", "image.train.num_workers=1", "image.train.max_failures=0"],
        cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip

    assert done.returncode == 1, done.stderr[-3000:]
    [error] = [line for line in done.stderr.splitlines() if line.startswith("dlbatch: error:")]
    assert "[image] train.compile: torch.compile failed (InvalidCxxCompiler:" in error
    assert error.endswith("set image.train.compile=false to train without it")


def test_a_training_worker_hides_only_torchs_warning_about_read_only_batches():
    """Its line per worker in the job log says nothing a user can act on; other warnings still show."""
    seen = fresh_python(
        "import warnings, numpy as np, torch\n"
        "from dlbatch.train import _quiet_worker_logs\n"
        "_quiet_worker_logs()\n"
        "stored = np.zeros(4); stored.flags.writeable = False\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    torch.as_tensor(stored); warnings.warn('any other warning')\n"
        "print([str(w.message) for w in caught])"
    )
    assert seen == "['any other warning']"
