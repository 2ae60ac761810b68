"""End to end on a real local Ray cluster: train each model for 2 epochs on demo data, evaluate, predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import config_for, fresh_python
from ray.util.state import list_actors

from dlbatch.checkpoint import load_model
from dlbatch.models import build_model
from dlbatch.runner import run_nightly, run_predict, run_train
from dlbatch.store import SUCCESS


def _rows(path) -> int:
    return pads.dataset(path, format="parquet").count_rows()


def _actor_ids() -> dict[str, str]:
    """Every actor the cluster has had, dead or alive: id -> class name."""
    actors = list_actors(limit=10_000, timeout=60, raise_on_missing_output=False)
    return {actor.actor_id: actor.class_name for actor in actors}


@pytest.mark.parametrize(("task", "chance", "min_acc"), [("image", 0.10, 0.60), ("text", 0.25, 0.60)])
def test_nightly_trains_evaluates_and_predicts(ray_cluster, demo_root, tmp_path, task, chance, min_acc):
    extra = ["text.data.passthrough_columns=[text]"] if task == "text" else []
    cfg = config_for(
        tmp_path, task, demo_root, f"{task}.train.epochs=2", f"{task}.train.batch_size=32", *extra
    )
    before = _actor_ids()
    [summary] = run_nightly(cfg)

    assert summary["test_accuracy"] > min_acc > chance
    # The fit ran without the Ray Train helper actors this job has no use for on its own local cluster
    # (dlbatch.train.trainer_class). Other tests on this shared cluster build Ray's TorchTrainer directly.
    started = {name for actor_id, name in _actor_ids().items() if actor_id not in before}
    assert "TrainController" in started
    assert not started & {"DatasetManager", "PlacementGroupCleaner"}
    score_rows = _rows(demo_root[task]["score"])
    assert summary["rows"]["score"] == {"read": score_rows, "used": score_rows, "rejected": 0}
    assert summary["rows"]["train"]["used"] == _rows(demo_root[task]["train"])
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    for h in summary["history"]:
        assert {"train_loss", "val_loss", "val_accuracy", "samples_per_s"} <= h.keys()
        assert h["val_rows"] == summary["rows"]["val"]["used"] == _rows(demo_root[task]["val"])
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

    # The checkpoint carries what inference needs: weights, optimizer, label map, vocabulary, config.
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert {"model_args", "label_names", "config", "epoch"} <= meta.keys()
    assert (run_dir / "model" / "optimizer.pt").exists()
    if task == "text":
        assert meta["label_names"] == ["business", "health", "science", "sports"]
        assert 2 < len(meta["vocab"]) <= 9998

    # A second scoring run for the same date is a no-op: still exactly one row per input.
    [again] = run_predict(cfg)
    assert _rows(pred_dir) == score_rows
    assert "predict" not in again["durations_s"]

    # Forced, in the GPU layout on CPUs (decode / tokenize in a task stage, an actor pool runs the model):
    # the same predictions, pass-through columns included.
    pool = [f"{task}.predict.compute=actors", f"{task}.predict.preprocess=tasks", "force=true"]
    [pooled] = run_predict(config_for(tmp_path, task, demo_root, *extra, *pool))
    assert pooled["rows"]["score"] == summary["rows"]["score"]
    again = pads.dataset(pred_dir, format="parquet").to_table()
    key = [("id", "ascending")]
    before, after = preds.sort_by(key), again.select(preds.column_names).sort_by(key)
    assert before.drop(["probs", "confidence"]).equals(after.drop(["probs", "confidence"]))
    assert np.allclose(before["confidence"].to_numpy(), after["confidence"].to_numpy(), atol=1e-5)


def test_a_compiled_fit_trains_as_the_eager_one_and_checkpoints_the_plain_model(
    ray_cluster, demo_root, tmp_path
):
    """``train.compile``: torch.compile's kernels add in another order, so the losses agree closely, not bit
    for bit; the checkpoint holds the plain model's weights (no wrapper's prefix), which inference loads."""
    [eager] = run_train(config_for(tmp_path / "eager", "image", demo_root, "image.train.epochs=2"))
    [compiled] = run_train(
        config_for(
            tmp_path / "compiled", "image", demo_root, "image.train.epochs=2", "image.train.compile=true"
        )
    )

    losses = {
        name: [h["train_loss"] for h in s["history"]]
        for name, s in (("eager", eager), ("compiled", compiled))
    }
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)
    assert losses["compiled"][1] < losses["compiled"][0]
    assert abs(compiled["test_accuracy"] - eager["test_accuracy"]) <= 0.02
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


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_rank_gets_its_own_rows_equal_for_training_and_all_of_validation(ray_cluster, workers):
    import ray.data

    from dlbatch.pipeline import split_for_ranks
    from dlbatch.train import shard_name

    train = ray.data.range(1001, override_num_blocks=3).materialize()
    val = (
        ray.data.range(101, override_num_blocks=2).map_batches(lambda b: {"id": b["id"] + 5000}).materialize()
    )
    parts = split_for_ranks({"train": train, "val": val}, workers)

    assert set(parts) == {shard_name(s, r) for s in ("train", "val") for r in range(workers)}
    ids = {name: sorted(row["id"] for row in ds.take_all()) for name, ds in parts.items()}
    train_ids = [ids[shard_name("train", r)] for r in range(workers)]
    val_ids = [ids[shard_name("val", r)] for r in range(workers)]
    # DDP ranks must take the same number of steps: equal training parts, at most workers - 1 rows left out.
    assert len({len(p) for p in train_ids}) == 1
    assert 1001 - (workers - 1) <= sum(map(len, train_ids)) <= 1001
    assert len(set().union(*map(set, train_ids))) == sum(map(len, train_ids))  # no row on two ranks
    # Validation scores every row exactly once, spread evenly.
    assert sorted(i for p in val_ids for i in p) == list(range(5000, 5101))
    assert max(map(len, val_ids)) - min(map(len, val_ids)) <= 1


def test_training_rows_come_in_one_order_per_seed(ray_cluster, tmp_path):
    """The training split is read in a file order drawn from a seed, rows kept in that order: a run resumed
    by a new driver (mid-epoch checkpoints skip the steps already taken) sees the first attempt's order."""
    import ray.data

    from dlbatch.config import JobConfig
    from dlbatch.data import inspect_split, read_split

    for i in range(8):
        ids = list(range(i * 300, (i + 1) * 300))
        pq.write_table(
            pa.table({"id": ids, "text": ["a b"] * 300, "label": ["x"] * 300}), tmp_path / f"p{i}.parquet"
        )
    info = inspect_split("train", str(tmp_path), JobConfig().text.model_dump(), "text", True)

    def order(seed):
        # A per-batch map in many small blocks, as preprocessing is: block completion order varies.
        ds = read_split(info, columns=["id"], shuffle_seed=seed).map_batches(lambda b: b, batch_size=50)
        return [row["id"] for row in ds.materialize().take_all()]

    first = order(7)
    assert sorted(first) == list(range(2400))
    assert order(7) == first  # the same rows in the same order on another execution
    file_orders = {tuple(ids[::300]) for ids in (first, *(order(seed) for seed in (1, 2, 3)))}
    assert len(file_orders) > 1  # the seed does shuffle the files
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False  # only that dataset


def test_each_rank_iterates_its_part_in_one_order_every_epoch(ray_cluster):
    """As a training worker gets them (in the train loop's config, pickled into another process), each
    rank's part yields its batches in the stored order on every pass: a mid-epoch resume skips the batches
    its checkpoint took, and a rerun must train the same model."""
    import ray
    import ray.data

    from dlbatch.pipeline import split_for_ranks
    from dlbatch.train import rank_parts, shard_name

    data = ray.data.range(6000, override_num_blocks=60).map_batches(lambda b: b, batch_size=50).materialize()
    parts = split_for_ranks({"train": data, "val": data}, 2)

    def blocks(part) -> list[str]:
        return [ref.hex() for bundle in part.iter_internal_ref_bundles() for ref in bundle.block_refs]

    @ray.remote
    def two_passes(config: dict, rank: int) -> tuple[list[str], list[list[int]]]:
        train_part, _ = rank_parts(config["shards"], rank)  # as the worker takes them

        def one_pass():
            batches = train_part.iter_torch_batches(batch_size=64, prefetch_batches=2)
            return [int(i) for batch in batches for i in batch["id"]]

        return blocks(train_part), [one_pass(), one_pass()]

    for rank in range(2):
        part = parts[shard_name("train", rank)]
        stored = [row["id"] for row in part.take_all()]
        assert len(stored) == 3000
        held, passes = ray.get(two_passes.remote({"shards": parts}, rank))
        assert passes == [stored, stored]
        assert held == blocks(part)  # the driver's blocks themselves: materializing copied nothing


def test_a_training_worker_hides_only_torchs_warning_about_read_only_batches():
    """Its line per worker in the job log says nothing a user can act on; other warnings still show."""
    seen = fresh_python(
        "import warnings, numpy as np, torch\n"
        "from dlbatch.train import _quiet_per_epoch_logs\n"
        "_quiet_per_epoch_logs()\n"
        "stored = np.zeros(4); stored.flags.writeable = False\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    torch.as_tensor(stored); warnings.warn('any other warning')\n"
        "print([str(w.message) for w in caught])"
    )
    assert seen == "['any other warning']"


def test_only_a_cluster_this_process_started_counts_as_its_own(ray_cluster):
    """The lean fit (no placement-group cleaner; the driver removes what a dead controller left) is for a
    cluster the driver started. A driver that joined a cluster started elsewhere, where other jobs may run,
    keeps Ray Train's cleaner and removes nothing."""
    from dlbatch.cluster import runs_own_cluster

    assert runs_own_cluster()  # this test process started the session's cluster
    address = ray_cluster.get_runtime_context().gcs_address
    joined = fresh_python(
        f"import ray; ray.init(address={address!r}, logging_level='ERROR')\n"
        "from dlbatch.cluster import runs_own_cluster; print(runs_own_cluster())"
    )
    assert joined == "False"
