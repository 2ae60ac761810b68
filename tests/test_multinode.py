"""Multi-node on one machine: elastic training through a node's loss and return, and Ray Data's work on
labelled CPU nodes. One helper process (tests/multinode_run.py) starts the cluster once for both: a
night with a data node first, then the elastic fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def multinode(demo_root, tmp_path_factory) -> dict:
    paths = demo_root["text"]
    root = tmp_path_factory.mktemp("multinode")
    log = root / "multinode.log"
    with log.open("w") as out:
        helper = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "multinode_run.py"), str(root), paths["train"], paths["val"],
             paths["test"], "--data-nodes", paths["score"]],
            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        try:
            helper.wait(timeout=600)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-s", str(helper.pid)], check=False)
            helper.wait()
            pytest.fail("multi-node run did not finish in 600 s; log tail:\n" + log.read_text()[-6000:])
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert helper.returncode == 0 and lines, text[-6000:]
    return json.loads(lines[0].removeprefix("RESULT "))


@pytest.mark.slow
def test_an_elastic_fit_goes_on_with_one_worker_when_a_node_is_lost_and_grows_back(multinode):
    """num_workers=[1, 2]: a worker node removed mid-fit and none to replace it, the fit resumes from its
    checkpoint with one worker; a node added back, a later epoch trains with two. Every epoch once, with
    every training row (equal shards at either size: 1,500 rows)."""
    result = multinode
    assert "removed_node" in result, "no worker node was removed: the test did not test anything"
    assert result["worker_nodes_hosting"] >= 1
    history = result["summary"]["history"]
    assert [h["epoch"] for h in history] == list(range(8))
    resumed = {h["resumed_from_epoch"] for h in history} - {None}
    assert resumed, "the run started over instead of resuming from its checkpoint"
    sizes = [h["world_size"] for h in history]
    assert sizes[0] == 2 and 1 in sizes, sizes  # started with two, went on with one
    assert 2 in sizes[sizes.index(1) :], sizes  # and grew back to two
    assert [h["train_samples"] for h in history] == [1500] * 8
    assert result["summary"]["test_accuracy"] > 0.5
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in result["phases_s"].items())
    print(f"node removal: resumed after epoch {min(resumed)}; helper phases: {phases}")


@pytest.mark.slow
def test_ray_datas_work_runs_on_the_data_nodes_and_training_does_not(multinode):
    """A cluster with a node labelled dlbatch-role=data (cluster.data_nodes=auto): the night's Ray Data
    tasks (ingest, evaluation, scoring) run there, the training workers on the other nodes; Ray's state API
    says where each ran."""
    result = multinode["data_nodes"]
    assert result["status"] == "promoted"
    tasks = result["data_tasks"]
    assert tasks, "no Ray Data task was recorded: the test did not test anything"
    assert all(on_data for _, on_data in tasks), tasks
    assert any("preprocess_for_training" in name for name, _ in tasks)  # the training ingest
    assert any("predict_batch" in name for name, _ in tasks)  # evaluation and scoring
    assert result["train_workers_on_data_node"] == [False, False]
    assert result["val_ranks"] == [2]  # and both ranks validated a part of the split
