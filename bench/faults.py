"""What each injected fault costs: the same work with and without the fault, on the same data and machine,
in one run. Faults are real: processes killed with SIGKILL, a node removed from a running cluster.

    python bench/faults.py [--train-rows 60000] [--score-rows 40000] [--only FAULT ...] [--out bench/faults.json]

Faults (text task; the image task shares every code path measured here):
  training worker killed 60% into epoch 2, with end-of-epoch checkpoints only, and again with mid-epoch
  checkpoints (train.checkpoint_every_steps); the clean run of each has the same checkpoints;
  a training job (the driver and its local Ray) killed 60% into epoch 2, then run again;
  a worker node removed mid-training on a 3-node cluster on this machine (tests/multinode_run.py);
  a prediction job killed once it has written its first file, then run again;
  an inference process killed mid-job, with an actor pool and with Ray tasks.
Lost seconds = faulted - clean, of the stage that was hit (fit(), the prediction stage, or the whole job
from its start to its rerun's end). Every faulted run is also checked for exact output: every epoch trained
on every row once; one prediction per input row, no duplicate ids; a faulted fit's model is compared
with its clean run's, weight for weight. Prints one table; writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fault-injection helpers the fault tests use

from faultutil import kill_process_when, kill_tree, registered_metrics, write_score_split  # noqa: E402

from dlbatch.checkpoint import load_model  # noqa: E402
from dlbatch.config import load_config  # noqa: E402
from dlbatch.demo import write_demo_data  # noqa: E402
from dlbatch.flow import run_predict, run_train  # noqa: E402
from dlbatch.store import PART_DONE  # noqa: E402

RUN_DATE = "2026-11-25"
EPOCHS = 3
KILL_INTO_EPOCH = 0.6  # the worker dies this far into epoch 2 (of the clean run's epoch time)


def _overrides(out: Path, data: dict[str, str], *extra: str) -> list[str]:
    splits = [f"text.data.{split}={path}" for split, path in data.items()]
    return ["tasks=[text]", f"output_root={out}", f"run_date={RUN_DATE}", *splits, *extra]


def _weights_digest(model_uri: str) -> str:
    """A fingerprint of the published model's weights: equal digests, bit-identical models."""
    digest = hashlib.sha256()
    for name, tensor in load_model(model_uri)[0].state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _epoch_1_registered(storage: Path) -> bool:
    """Ray Train has registered epoch 1's end-of-epoch checkpoint (a group restarted after it resumes there)."""
    return any(m.get("epoch") == 0 and m.get("step") is None for m in registered_metrics(storage))


def _fit_outcome(summary: dict) -> dict:
    """What a fit's summary says after a fault: where it resumed, whether it was exact, its model."""
    history = summary["history"]
    resumed = next((h for h in history if h["resumed_from_epoch"] is not None), None)
    return {
        "epoch_s": [h["epoch_s"] for h in history],
        "resumed_from": None if resumed is None else {
            "epoch": resumed["resumed_from_epoch"], "step": resumed["resumed_at_step"]},
        # Exact: epochs 0..n-1 once each, and each one trained on the same number of samples.
        "exact": [h["epoch"] for h in history] == list(range(EPOCHS))
        and len({h["train_samples"] for h in history}) == 1,
        "train_losses": [h["train_loss"] for h in history],
        "weights": _weights_digest(summary["paths"]["model"]),
        "test_accuracy": summary["test_accuracy"],
    }  # fmt: skip


def _train(out: Path, data: dict[str, str], extra: list[str], kill_after_s: float | None = None) -> dict:
    """One fit; with ``kill_after_s``, one training worker is SIGKILLed that long after epoch 1's
    checkpoint is registered (the restarted group resumes from the latest registered checkpoint)."""
    cfg = load_config(None, _overrides(out, data, f"text.train.epochs={EPOCHS}", *extra))
    storage = out / "ray_results" / f"text-{RUN_DATE}"
    state: dict = {}
    if kill_after_s is not None:

        def ready() -> bool:
            if "epoch_1_registered_at" not in state:
                if not _epoch_1_registered(storage):
                    return False
                state["epoch_1_registered_at"] = time.time()
            return time.time() - state["epoch_1_registered_at"] >= kill_after_s

        killer = kill_process_when("RayTrainWorker", ready, state)
    [summary] = run_train(cfg)
    if kill_after_s is not None:
        killer.join(timeout=1)
    return {
        "fit_s": summary["durations_s"]["train"],
        "killed": "killed_pid" in state if kill_after_s is not None else None,
        "test_accuracy": summary["test_accuracy"],
        **_fit_outcome(summary),
    }


def train_job_killed(root: Path, data: dict[str, str], extra: list[str]) -> dict:
    """Whole training jobs (``jobs/train.py``, their own local Ray each): clean, then SIGKILLed with their
    Ray 60% into epoch 2 (of the clean job's epoch time, counted from epoch 1's registered checkpoint), as
    when the driver's machine or pod dies, and run again: the rerun resumes from the last registered
    checkpoint. Lost = (killed job's time + rerun) - clean job."""

    def job(out: Path) -> list[str]:
        return [
            sys.executable,
            "jobs/train.py",
            *_overrides(out, data, f"text.train.epochs={EPOCHS}", *extra),
        ]

    def summary(out: Path) -> dict:
        return json.loads((out / "runs" / RUN_DATE / "text" / "summary.json").read_text())

    t0 = time.time()
    subprocess.run(job(root / "job-clean"), cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    clean_s = time.time() - t0
    clean = summary(root / "job-clean")
    kill_after_s = KILL_INTO_EPOCH * statistics.median(h["epoch_s"] for h in clean["history"])

    out = root / "job-faulted"
    storage = out / "ray_results" / f"text-{RUN_DATE}"
    t0 = time.time()
    proc = subprocess.Popen(job(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    while not _epoch_1_registered(storage):
        if proc.poll() is not None:
            raise RuntimeError("the training job ended before epoch 1's checkpoint was registered")
        time.sleep(0.1)
    time.sleep(kill_after_s)
    if proc.poll() is not None:
        raise RuntimeError("the training job ended before it could be killed")
    kill_tree(proc)
    killed_after_s = time.time() - t0
    t0 = time.time()
    rerun = subprocess.run(job(out), cwd=REPO, capture_output=True, text=True)
    rerun_s = time.time() - t0
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    return {
        "clean_s": clean_s,
        "faulted_s": killed_after_s + rerun_s,
        "killed_after_s": killed_after_s,
        "kill_after_s": kill_after_s,
        "killed": True,
        **_fit_outcome(summary(out)),
        "clean_weights": _weights_digest(clean["paths"]["model"]),
        "clean_test_accuracy": clean["test_accuracy"],
    }


def _rows(pred_dir: Path, expected: int) -> dict:
    ids = pads.dataset(pred_dir, format="parquet").to_table(columns=["id"])["id"]
    distinct = pc.count_distinct(ids).as_py()
    return {"rows": len(ids), "distinct_ids": distinct, "exact": len(ids) == distinct == expected}


def _predict_job(model: Path, out: Path, score: Path, rows_per_part: int | None) -> list[str]:
    args = ["tasks=[text]", f"output_root={out}", f"text.data.score={score}"]
    if rows_per_part:
        args.append(f"text.predict.rows_per_part={rows_per_part}")
    return [sys.executable, "jobs/predict.py", f"--run-date={RUN_DATE}", f"--model={model}", *args]


def predict_job_killed(
    root: Path, model: Path, score: Path, rows: int, rows_per_part: int | None = None
) -> dict:
    """Whole prediction jobs (their own local Ray each), each into its own output root: clean, then killed
    and run again. Lost = (killed job's time + rerun) - clean job. In one part (the default
    ``rows_per_part`` for this split) the job is killed at its first staged file and the rerun scores
    everything again; in several parts it is killed once its first part is finished, which the rerun
    keeps."""
    name = f"parts-{rows_per_part}" if rows_per_part else "one-part"
    t0 = time.time()
    subprocess.run(_predict_job(model, root / f"{name}-clean", score, rows_per_part), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    clean_s = time.time() - t0

    out = root / f"{name}-faulted"
    run_dir = out / "runs" / RUN_DATE / "text"
    staging = run_dir / "_staging" / "score-parts"
    t0 = time.time()
    job = subprocess.Popen(
        _predict_job(model, out, score, rows_per_part),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    killed_at = f"*/{PART_DONE}" if rows_per_part else "*/*.parquet"
    while not list(staging.glob(killed_at)):
        if job.poll() is not None:
            raise RuntimeError("the prediction job ended before it could be killed")
        time.sleep(0.05)
    kill_tree(job)
    killed_after_s = time.time() - t0
    nothing_visible = not (run_dir / "predictions").exists()  # readers see no partial output
    t0 = time.time()
    rerun = subprocess.run(
        _predict_job(model, out, score, rows_per_part), cwd=REPO, capture_output=True, text=True
    )
    rerun_s = time.time() - t0
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # The job logs how many parts an earlier attempt finished ("text: 1 of 4 score parts were finished ...").
    reused = re.search(r"(\d+) of (\d+) score parts were finished", rerun.stderr)
    return {
        "clean_s": clean_s,
        "faulted_s": killed_after_s + rerun_s,
        "killed_after_s": killed_after_s,
        "rows_per_part": rows_per_part,
        "score_parts_reused": f"{reused[1]} of {reused[2]}" if reused else None,
        "nothing_visible_after_kill": nothing_visible,
        **_rows(run_dir / "predictions", rows),
    }


def inference_killed(out: Path, score: Path, rows: int, compute: str, title: str) -> dict:
    """The prediction stage in this process, clean and with one inference process killed once the first
    predictions are staged. Lost = the faulted stage's time - the clean stage's."""
    cfg = load_config(None, _overrides(out, {"score": str(score)}, "force=true",
                                       f"text.predict.compute={compute}", "text.predict.batch_size=128"))  # fmt: skip
    run_dir = out / "runs" / RUN_DATE / "text"
    [clean] = run_predict(cfg)
    state: dict = {}
    killer = kill_process_when(
        title,
        lambda: bool(list((run_dir / "_staging").glob("score-parts/*/*.parquet"))),
        state,
        new_processes_only=False,
    )
    [faulted] = run_predict(cfg)
    killer.join(timeout=1)
    return {
        "clean_s": clean["durations_s"]["predict"],
        "faulted_s": faulted["durations_s"]["predict"],
        "killed": "killed_pid" in state,
        **_rows(run_dir / "predictions", rows),
    }


def node_removed(root: Path, data: dict[str, str]) -> dict:
    """tests/multinode_run.py (3 nodes, training spread over two, 8 epochs) without and with a worker
    node removed once a checkpoint is registered."""
    runs = {}
    for name, flag in (("clean", ["--no-fault"]), ("faulted", [])):
        out = root / f"multinode-{name}"
        done = subprocess.run(
            [sys.executable, str(REPO / "tests" / "multinode_run.py"), str(out),
             data["train"], data["val"], data["test"], *flag],
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"multinode_run.py {name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        runs[name] = json.loads(lines[0].removeprefix("RESULT "))
    history = runs["faulted"]["summary"]["history"]
    resumed = {h["resumed_from_epoch"] for h in history} - {None}
    return {
        "clean_s": runs["clean"]["summary"]["durations_s"]["train"],
        "faulted_s": runs["faulted"]["summary"]["durations_s"]["train"],
        "killed": "removed_node" in runs["faulted"],
        "resumed_from": {"epoch": min(resumed), "step": None} if resumed else None,
        "exact": [h["epoch"] for h in history] == list(range(10)),
    }


def _where(resumed: dict | None) -> str:
    """Where a restarted worker group resumed, counting epochs from 1 as the job's log lines do."""
    if not resumed:
        return "-"
    if resumed.get("step"):
        return f"epoch {resumed['epoch'] + 1} step {resumed['step']}"
    return f"end of epoch {resumed['epoch'] + 1}"


FAULTS = ("worker", "worker-mid-epoch", "driver", "predict-job", "predict-job-parts", "actor", "task", "node")


def print_table(results: dict) -> None:
    print(
        f"\nfault costs ({results['train_rows']:,} training rows, {EPOCHS} epochs; {results['score_rows']:,} rows scored)"
    )
    rows = []
    for name, label in (
        ("worker_killed_epoch_checkpoints", "training worker killed, epoch checkpoints"),
        (
            "worker_killed_mid_epoch_checkpoints",
            f"  same, checkpoint every {results['checkpoint_every_steps']} steps",
        ),
    ):
        if name not in results:
            continue
        clean, faulted = results[name]["clean"], results[name]["faulted"]
        accuracy = f"{clean['test_accuracy']:.1%} / {faulted['test_accuracy']:.1%}"
        rows.append((label, clean["fit_s"], faulted["fit_s"], faulted["resumed_from"],
                     faulted["exact"] and faulted["killed"], accuracy))  # fmt: skip
    if "train_job_killed" in results:
        r = results["train_job_killed"]
        accuracy = f"{r['clean_test_accuracy']:.1%} / {r['test_accuracy']:.1%}"
        rows.append(("training job (driver) killed, then rerun", r["clean_s"], r["faulted_s"],
                     r["resumed_from"], r["exact"], accuracy))  # fmt: skip
    for name, label in (
        ("node_removed", "worker node removed (3 nodes, 8 epochs)"),
        ("predict_job_killed", "prediction job killed, then rerun"),
        ("predict_job_killed_parts", "  same, 4 parts, killed after the first"),
        ("actor_killed", "inference actor killed"),
        ("task_killed", "inference task's worker killed"),
    ):
        if name not in results:
            continue
        r = results[name]
        ok = r["exact"] and r.get("killed", True) and r.get("nothing_visible_after_kill", True)
        rows.append((label, r["clean_s"], r["faulted_s"], r.get("resumed_from"), ok, "-"))
    print(
        f"{'fault':44} {'clean s':>8} {'faulted s':>9} {'lost s':>7}  {'resumed from':18} exact  test acc clean / faulted"
    )
    for label, clean_s, faulted_s, resumed, ok, same in rows:
        print(
            f"{label:44} {clean_s:8.1f} {faulted_s:9.1f} {faulted_s - clean_s:7.1f}  {_where(resumed):18} "
            f"{ok!s:6} {same}"
        )
    print(
        "(exact: every epoch once, each on the same number of samples; a resumed fit trains on fresh "
        "shuffles, so its model matches the clean one in accuracy, not bit for bit)"
    )
    if "predict_job_killed_parts" in results:
        parts = results["predict_job_killed_parts"]
        print(f"(prediction job in parts of {parts['rows_per_part']:,} rows: the rerun kept "
              f"{parts['score_parts_reused']})")  # fmt: skip
    if "kill_after_s" in results:
        print(f"(the training worker is killed {results['kill_after_s']:.1f} s after epoch 1's checkpoint is "
              "registered)")  # fmt: skip
    if "train_job_killed" in results:
        print(f"(the training job is killed {results['train_job_killed']['kill_after_s']:.1f} s after epoch 1's "
              "checkpoint is registered)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-rows", type=int, default=60_000)
    parser.add_argument("--score-rows", type=int, default=40_000)
    parser.add_argument("--checkpoint-every-steps", type=int, default=None,
                        help="mid-epoch checkpoint interval (default: a quarter of an epoch's steps)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS), metavar="FAULT",
                        help=f"run only these faults, of: {' '.join(FAULTS)} (default: all)")  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).parent / "faults.json"))
    args = parser.parse_args()
    only = set(args.only)

    root = Path(tempfile.mkdtemp(prefix="dlbatch-faults-"))
    try:
        data = write_demo_data(root / "data", "text", train_rows=args.train_rows, seed=0)
        small = write_demo_data(root / "data", "text", train_rows=1500, seed=0)
        score = write_score_split(root / "score", args.score_rows)

        batch = 32
        steps_per_epoch = args.train_rows // 2 // batch  # two workers
        every = args.checkpoint_every_steps or max(1, steps_per_epoch // 4)
        mid_epoch = [f"text.train.batch_size={batch}", f"text.train.checkpoint_every_steps={every}"]
        epoch_only = [f"text.train.batch_size={batch}"]

        results: dict = {"train_rows": args.train_rows, "score_rows": args.score_rows, "epochs": EPOCHS,
                         "checkpoint_every_steps": every, "steps_per_epoch": steps_per_epoch,
                         "faults": sorted(only)}  # fmt: skip
        if only & {"worker", "worker-mid-epoch", "predict-job", "predict-job-parts", "actor", "task"}:
            # Its model is the one the prediction faults score with.
            clean = _train(root / "train-clean", data, epoch_only)
            kill_after_s = KILL_INTO_EPOCH * statistics.median(clean["epoch_s"])
        if "worker" in only:
            results["worker_killed_epoch_checkpoints"] = {
                "clean": clean, "faulted": _train(root / "train-faulted", data, epoch_only, kill_after_s)}  # fmt: skip
        if "worker-mid-epoch" in only:
            results["worker_killed_mid_epoch_checkpoints"] = {
                "clean": _train(root / "mid-clean", data, mid_epoch),
                "faulted": _train(root / "mid-faulted", data, mid_epoch, kill_after_s),
            }
        if only & {"worker", "worker-mid-epoch"}:
            results["kill_after_s"] = kill_after_s

        model_root = root / "train-clean"  # holds the trained model the prediction runs use
        model = model_root / "runs" / RUN_DATE / "text" / "model"
        if "predict-job" in only:
            results["predict_job_killed"] = predict_job_killed(root, model, score, args.score_rows)
        if "predict-job-parts" in only:
            results["predict_job_killed_parts"] = predict_job_killed(
                root, model, score, args.score_rows, rows_per_part=args.score_rows // 4
            )
        if "actor" in only:
            results["actor_killed"] = inference_killed(
                model_root, score, args.score_rows, "actors", "MapWorker(MapBatches(Predictor))"
            )
        if "task" in only:
            results["task_killed"] = inference_killed(
                model_root, score, args.score_rows, "tasks", "MapBatches(predict_batch)"
            )
        import ray

        ray.shutdown()  # the jobs and the multi-node helper below start their own clusters
        if "driver" in only:
            results["train_job_killed"] = train_job_killed(root, data, epoch_only)
        if "node" in only:
            results["node_removed"] = node_removed(root, small)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
