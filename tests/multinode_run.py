"""Helper run by test_multinode.py in its own process: a 3-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``) whose two worker nodes fit one training worker each, an elastic fit
(``num_workers=[1, 2]``) over both, one worker node removed mid-training with no replacement (the fit goes
on with one worker), then a node added back (it grows to two again).

    python tests/multinode_run.py OUTPUT_ROOT TRAIN VAL TEST [--no-fault] [--data-nodes SCORE]

Prints one JSON line. ``--no-fault`` trains on the same 3-node cluster without removing a node:
bench/faults.py's baseline. ``--data-nodes SCORE`` adds a fourth node labelled ``dlbatch-role=data`` and,
before the elastic fit, runs a whole text night (train, evaluate, score SCORE) on the cluster, recording
from Ray's state API on which node each Ray Data task and each training worker ran: one cluster start
for both multi-node tests.
"""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from faultutil import registered_checkpoints
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from dlbatch.config import load_config
from dlbatch.flow import run_nightly, run_train


def data_nodes_night(out: str, data_node_id: str, splits: list[str]) -> dict:
    """A text night on the cluster with a data node (cluster.data_nodes=auto): where Ray's state API says
    each Ray Data task and each training worker ran."""
    train, val, test, score = splits
    cfg = load_config(None, [
        "tasks=[text]", f"output_root={out}", "run_date=2026-11-25",
        f"text.data.train={train}", f"text.data.val={val}", f"text.data.test={test}",
        f"text.data.score={score}", "text.train.epochs=1", "text.train.num_workers=2",
        "text.train.cpus_per_worker=2", "text.train.batch_size=32", "quality_margin=0",
    ])  # fmt: skip
    [summary] = run_nightly(cfg)
    tasks = [t for t in list_tasks(detail=True, limit=10_000, raise_on_missing_output=False)
             if t.type == "NORMAL_TASK"]  # fmt: skip
    actors = list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    return {
        "status": summary["verdict"]["status"],
        "data_tasks": sorted({(t.name, t.node_id == data_node_id) for t in tasks if "Map" in t.name or "Read" in t.name}),
        "train_workers_on_data_node": [a.node_id == data_node_id for a in actors if a.class_name == "RayTrainWorker"],
        "val_ranks": [h["val_ranks"] for h in summary["history"]],
    }  # fmt: skip


def main(out: str, train: str, val: str, test: str, fault: bool = True, score: str | None = None) -> dict:
    # A lost node's replacement is waited for this long before the fit goes on with fewer workers (Ray
    # Train's default: 60 s, for an autoscaler to bring one).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    head: dict = {"num_cpus": 1}
    if score:
        with socket.socket() as probe:  # the dashboard (the state API's server) on a free loopback port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        head.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    # The head's one CPU is Ray Data's (the data node's, when there is one); a training worker takes a
    # worker node's two.
    began = time.time()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    data_node = cluster.add_node(num_cpus=2, labels={"dlbatch-role": "data"}) if score else None
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    result: dict = {"phases_s": {"cluster_start": time.time() - began}}
    if data_node is not None:
        result["data_nodes"] = data_nodes_night(
            f"{out}/data-nodes", data_node.node_id, [train, val, test, score]
        )
        # Gone before the elastic fit: Ray Train's elastic scaling (2.60) counts a node's CPUs as room for
        # a worker whatever the workers' label selector says, and after the node loss below it would retry
        # two workers (one of them on the data node, which the selector forbids) without end.
        cluster.remove_node(data_node)
        result["phases_s"]["data_nodes_night"] = time.time() - began - result["phases_s"]["cluster_start"]
    out = f"{out}/elastic"
    cfg = load_config(None, [
        "tasks=[text]", f"output_root={out}", "run_date=2026-11-25",
        f"text.data.train={train}", f"text.data.val={val}", f"text.data.test={test}",
        "text.train.epochs=8", "text.train.batch_size=16", "text.train.max_failures=3",
        "text.train.num_workers=[1, 2]", "text.train.cpus_per_worker=2", "text.train.elastic_resize_interval_s=3",
    ])  # fmt: skip
    storage = Path(out) / "ray_results" / "text-2026-11-25"
    state: dict = {}

    def train_worker_nodes() -> list:
        """Worker nodes hosting a RayTrainWorker: on one machine each node is its own raylet process, and
        actor processes are the raylet's children (read from the OS; the state API can time out here)."""
        hosting = []
        for node in workers:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            titles = [" ".join(c.cmdline()) for c in raylet.children(recursive=True) if c.is_running()]
            if any(t.startswith("ray::RayTrainWorker") for t in titles):
                hosting.append(node)
        return hosting

    def remove_a_worker_node():
        deadline = time.time() + 300
        while time.time() < deadline and fitting.is_alive():
            if registered_checkpoints(storage) >= 1:
                try:
                    hosting = train_worker_nodes()
                except psutil.Error:
                    hosting = []
                if hosting:
                    state["worker_nodes_hosting"] = len(hosting)
                    state["removed_node"], state["removed_at"] = hosting[0].node_id, time.time()
                    seen = registered_checkpoints(storage)
                    cluster.remove_node(hosting[0])
                    workers.remove(hosting[0])
                    break
            time.sleep(0.2)
        # Capacity returns once the shrunk group has trained an epoch: a new node, as an autoscaler adds.
        while time.time() < deadline and fitting.is_alive():
            if registered_checkpoints(storage) > seen:
                workers.append(cluster.add_node(num_cpus=2))
                state["added_at"] = time.time()
                return
            time.sleep(0.2)

    # The fit runs in a thread: a node can only be added from the main thread (Ray installs its signal
    # handlers there).
    summaries: list = []
    fitting = threading.Thread(target=lambda: summaries.extend(run_train(cfg)), daemon=True)
    started = time.time()
    fitting.start()
    if fault:
        remove_a_worker_node()
    fitting.join()
    assert summaries, "the fit failed (its traceback is above)"
    result.update(summary=summaries[0], seconds=time.time() - started, **state)
    result["phases_s"]["elastic_fit"] = result["seconds"]
    stopping = time.time()
    ray.shutdown()
    # The helper exits next: its nodes' processes are killed at once (a graceful stop of four nodes took
    # ~14 s here), the head's last.
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    result["phases_s"]["shutdown"] = time.time() - stopping
    return result


if __name__ == "__main__":
    flags = sys.argv[5:]
    score = flags[flags.index("--data-nodes") + 1] if "--data-nodes" in flags else None
    print(
        "RESULT "
        + json.dumps(main(*sys.argv[1:5], fault="--no-fault" not in flags, score=score), default=str)
    )
