"""Faults injected for real: worker and actor processes killed with SIGKILL, a job killed mid-write."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import config_for
from faultutil import (
    kill_process_when,
    kill_tree,
    latest_registered_metrics,
    registered_checkpoints,
    write_score_split,
)

from dlbatch.flow import run_predict, run_train
from dlbatch.recipe import lr_factor, plan_schedule, steps_per_epoch
from dlbatch.store import PART_DONE, SUCCESS

REPO = Path(__file__).parents[1]
RUN_DATE = "2026-11-25"


def _text_fit_killing(title: str, out: Path, demo_root: dict, epochs: int):
    """A text fit's config, and a thread that kills one ``ray::{title}`` process of it once its controller
    has *registered* two checkpoints (its snapshot file): checkpoint files on disk are not enough, one still
    being reported when a worker dies is dropped and not resumed from. Returns (config, state, thread)."""
    overrides = (f"text.train.epochs={epochs}", "text.train.batch_size=32", "text.train.max_failures=2")
    cfg = config_for(out, "text", demo_root, *overrides)
    storage = out / "ray_results" / f"text-{RUN_DATE}"
    state: dict = {}
    return cfg, state, kill_process_when(title, lambda: registered_checkpoints(storage) >= 2, state)


@pytest.fixture(scope="module")
def trained_text(ray_cluster, demo_root, tmp_path_factory):
    """A text model trained while one training worker is killed once two checkpoints are registered."""
    out = tmp_path_factory.mktemp("faults")
    cfg, state, killer = _text_fit_killing("RayTrainWorker", out, demo_root, epochs=4)
    started = time.time()
    [summary] = run_train(cfg)
    killer.join(timeout=1)
    return cfg, out, summary, state, time.time() - started


def assert_schedule_went_on(cfg, history: list[dict], rows: int = 1500) -> None:
    """Each epoch ended at the rate its step number has in the fit's plan: a resumed group that restarted
    its schedule (from the warm-up) would end its epochs at other rates."""
    train = cfg.text.train
    plan, per_epoch = plan_schedule(train, rows), steps_per_epoch(rows, train)
    expected = [plan.peak_lr * lr_factor((h["epoch"] + 1) * per_epoch, plan.warmup_steps, plan.total_steps,
                                         plan.decay) for h in history]  # fmt: skip
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_worker_killed_mid_training_resumes_from_checkpoint(trained_text):
    cfg, out, summary, state, seconds = trained_text
    assert "killed_pid" in state, "the worker was never killed: the test did not test anything"
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(4))  # finished all configured epochs, no repeats
    resumed = [h["resumed_from_epoch"] for h in history if h["resumed_from_epoch"] is not None]
    # The restarted group resumed from a registered checkpoint (epoch >= 1, two were registered before the
    # kill), not from scratch: the epochs after it carry the checkpoint's epoch.
    assert resumed, "the run started over instead of resuming"
    assert resumed[0] >= 1 and set(resumed) == {resumed[0]}
    assert all(h["resumed_from_epoch"] is None for h in history[: resumed[0] + 1])
    assert_schedule_went_on(cfg, history)
    assert summary["test_accuracy"] > 0.5
    print(f"worker kill: resumed after epoch {resumed[0]}, whole run {seconds:.0f}s")


def test_rerun_of_finished_training_does_not_retrain(trained_text):
    cfg, out, summary, _, _ = trained_text
    started = time.time()
    [again] = run_train(cfg)
    assert "train" not in again["durations_s"]
    assert again["history"] == summary["history"]
    assert time.time() - started < 60


MID_EPOCH = (
    "text.train.epochs=2", "text.train.batch_size=8", "text.train.checkpoint_every_steps=40",
    "text.train.max_failures=2",
)  # fmt: skip


def test_worker_killed_mid_epoch_resumes_that_epoch_with_the_steps_it_had_left(
    ray_cluster, demo_root, tmp_path
):
    """With checkpoint_every_steps, a worker lost mid-epoch costs the steps since the last checkpoint, not
    the epoch. The restarted group restores the weights, the optimizer and the epoch's running sums, and
    trains the steps that epoch had left on a freshly shuffled pass (a streamed, shuffled epoch cannot
    replay the rows it had not reached yet): every epoch takes its full number of steps, once."""
    cfg = config_for(tmp_path, "text", demo_root, *MID_EPOCH)
    storage = tmp_path / "ray_results" / f"text-{RUN_DATE}"
    state: dict = {}
    # Kill once an epoch's first mid-epoch checkpoint (step 40 of 94) is the latest registered: a report
    # still in flight then is step 80's, not the epoch's end, so the resume is mid-epoch either way.
    killer = kill_process_when(
        "RayTrainWorker", lambda: (latest_registered_metrics(storage) or {}).get("step") == 40, state
    )
    [summary] = run_train(cfg)
    killer.join(timeout=1)
    assert "killed_pid" in state, "the worker was never killed: the test did not test anything"
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    resumed = [h for h in history if h["resumed_at_step"] is not None]
    assert resumed, "the restarted group did not resume from a mid-epoch checkpoint"
    first = resumed[0]
    assert first["resumed_at_step"] in (40, 80) and first["resumed_from_epoch"] == first["epoch"]
    # The resumed epoch counts the checkpoint's steps plus the steps after them: skipping too few or too
    # many batches would change its count.
    assert [h["train_samples"] for h in history] == [1500, 1500]
    assert_schedule_went_on(cfg, history)  # the schedule went on from the checkpoint's step
    assert summary["test_accuracy"] > 0.5
    print(f"mid-epoch kill: resumed epoch {first['epoch']} at step {first['resumed_at_step']}")


def test_controller_killed_releases_the_training_cpus_and_a_rerun_resumes(ray_cluster, demo_root, tmp_path):
    """Ray Train's controller killed mid-fit: the fit fails, its placement group does not keep holding the
    training CPUs for the rest of the run (Ray Train's cleaner removes it: it finds this cluster by the address
    that the session fixture gives its processes), and a rerun resumes from the last registered checkpoint."""
    import ray

    cfg, state, killer = _text_fit_killing("TrainController", tmp_path, demo_root, epochs=5)
    with pytest.raises(ray.exceptions.RayError):
        run_train(cfg)
    killer.join(timeout=1)
    assert "killed_pid" in state, "the controller was never killed: the test did not test anything"

    def held_placement_groups() -> list[str]:
        return [pg["state"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]

    deadline = time.time() + 60  # Ray Train's cleaner removes it once it sees the controller is gone
    while held_placement_groups() and time.time() < deadline:
        time.sleep(0.5)
    held = held_placement_groups()
    if held:  # freed before failing, so that the tests after this one do not starve for CPUs
        from ray.util.placement_group import PlacementGroup

        for pg_id, pg in ray.util.placement_group_table().items():
            if pg["state"] != "REMOVED":
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    assert held == []
    deadline = time.time() + 60  # the killed controller's workers exit on their own
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]

    [summary] = run_train(cfg)
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(5))
    resumed = {h["resumed_from_epoch"] for h in history if h["resumed_from_epoch"] is not None}
    assert len(resumed) == 1 and resumed.pop() >= 1, "the rerun started over instead of resuming"
    assert summary["test_accuracy"] > 0.5


def test_prediction_job_killed_midway_leaves_nothing_visible_then_rerun_keeps_finished_parts(
    trained_text, tmp_path
):
    """Scored in 4 parts of 10,000 rows (2 files each); the job is killed once its first part is finished.
    Readers see nothing; the rerun keeps the finished part, scores the rest and publishes every row once."""
    cfg, out, _, _, _ = trained_text
    score = write_score_split(tmp_path / "score-big", 40_000)  # 8 files of 5,000 rows
    # A run date of its own (the model named with --model): the other scoring tests leave it alone.
    date, model = "2026-11-26", out / "runs" / RUN_DATE / "text" / "model"
    run_dir = out / "runs" / date / "text"
    args = ["tasks=[text]", f"output_root={out}", f"text.data.score={score}", "text.predict.batch_size=256",
            "text.predict.rows_per_part=10000"]  # fmt: skip
    job = subprocess.Popen(
        [sys.executable, "jobs/predict.py", f"--run-date={date}", f"--model={model}", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    parts = run_dir / "_staging" / "score-parts"
    while not list(parts.glob(f"*/{PART_DONE}")):
        assert job.poll() is None, "the job ended before it was killed"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(job)
    finished = {p.parent.name for p in parts.glob(f"*/{PART_DONE}")}

    # Killed midway: readers see no predictions at all (no directory, no _SUCCESS).
    assert not (run_dir / "predictions").exists()
    assert finished and len(finished) < 4  # the rest is unfinished, in staging only

    from dlbatch.config import load_config

    [summary] = run_predict(load_config(None, [f"run_date={date}", *args]), model=str(model))
    assert summary["metrics"]["score_parts"] == {"parts": 4, "reused": len(finished)}
    assert summary["rows"]["score"] == {"read": 40_000, "used": 40_000, "rejected": 0}
    ids = pads.dataset(run_dir / "predictions", format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(pq.read_table(score, columns=["id"])["id"].to_pylist())
    assert len(ids) == len(set(ids)) == 40_000
    assert json.loads((run_dir / "predictions" / SUCCESS).read_text())["rows"] == 40_000
    assert not (run_dir / "_staging").exists() or not list((run_dir / "_staging").iterdir())


# Actors (the GPU path) are restarted with their batches retried; tasks (the CPU default) are retried.
# The process title names what it runs: "ray::MapWorker(MapBatches(Predictor))" for a pool actor,
# "ray::MapBatches(predict_batch)" for a worker while it runs a prediction task.
@pytest.mark.parametrize(
    "compute, title", [("actors", "MapWorker(MapBatches(Predictor))"), ("tasks", "MapBatches(predict_batch)")]
)
def test_inference_process_killed_output_is_still_exact(trained_text, tmp_path, compute, title):
    cfg, out, _, _, _ = trained_text
    score = write_score_split(tmp_path / "score-big", 40_000)
    from dlbatch.config import load_config

    date = {"actors": "2026-11-27", "tasks": "2026-11-28"}[compute]  # its own: no test sees another's output
    overrides = [f"run_date={date}", "tasks=[text]", f"output_root={out}", f"text.data.score={score}",
                 "text.predict.batch_size=128", f"text.predict.compute={compute}"]  # fmt: skip
    staging = out / "runs" / date / "text" / "_staging"
    state: dict = {}
    # Kill once some predictions are written: the model is loaded and batches are done and in flight.
    killer = kill_process_when(
        title, lambda: bool(list(staging.glob("score-parts/*/*.parquet"))), state, new_processes_only=False
    )
    model = str(out / "runs" / RUN_DATE / "text" / "model")  # run_train's model: no champion to default to
    [summary] = run_predict(load_config(None, overrides), model=model)
    killer.join(timeout=1)
    assert "killed_pid" in state, f"no {compute} process was killed: the test did not test anything"
    assert summary["rows"]["score"] == {"read": 40_000, "used": 40_000, "rejected": 0}
    ids = (
        pads.dataset(out / "runs" / date / "text" / "predictions").to_table(columns=["id"])["id"].to_pylist()
    )
    assert len(ids) == len(set(ids)) == 40_000


def test_scoring_while_other_work_holds_part_of_the_cluster_still_finishes(trained_text, tmp_path, caplog):
    """Another job holds half the CPUs: the actor pool is sized from what is free, less the share its read
    and write tasks need. Sized from the cluster's totals, it took every free CPU and its reads waited
    forever (the no-progress timeout is cut to a minute here, so that such a hang fails fast)."""
    import ray
    from ray.data import DataContext
    from ray.util.placement_group import placement_group, remove_placement_group

    from dlbatch.config import load_config

    cfg, out, _, _, _ = trained_text
    score = write_score_split(tmp_path / "score", 4_000, files=4)
    overrides = ["run_date=2026-11-29", "tasks=[text]", f"output_root={out}", f"text.data.score={score}",
                 "text.predict.compute=actors", "text.predict.batch_size=256"]  # fmt: skip
    model = str(out / "runs" / RUN_DATE / "text" / "model")
    held = placement_group([{"CPU": 3}])
    ray.get(held.ready(), timeout=60)
    context = DataContext.get_current()
    saved = context.execution_no_progress_timeout_s
    context.execution_no_progress_timeout_s = 60
    try:
        with caplog.at_level("INFO", logger="dlbatch"):
            [summary] = run_predict(load_config(None, overrides), model=model)
    finally:
        context.execution_no_progress_timeout_s = saved
        remove_placement_group(held)
    assert summary["rows"]["score"] == {"read": 4_000, "used": 4_000, "rejected": 0}
    assert "3 of 6 CPUs and 2 of 2 GPUs are free for inference" in caplog.text
