"""Helper run by test_multinode.py in its own process: a 3-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``) whose two worker nodes fit one training worker each, an elastic fit
(``num_workers=[1, 2]``) over both, one worker node removed mid-training with no replacement (the fit goes
on with one worker), then a node added back (it grows to two again).

    python tests/multinode_run.py OUTPUT_ROOT TRAIN VAL TEST [--no-fault]   # prints one JSON line

``--no-fault`` trains on the same 3-node cluster without removing a node: bench/faults.py's baseline.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from faultutil import registered_checkpoints
from ray.cluster_utils import Cluster

from dlbatch.config import load_config
from dlbatch.flow import run_train


def main(out: str, train: str, val: str, test: str, fault: bool = True) -> dict:
    # A lost node's replacement is waited for this long before the fit goes on with fewer workers (Ray
    # Train's default: 60 s, for an autoscaler to bring one).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    # The head's one CPU is Ray Data's; a training worker takes a worker node's two.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = load_config(None, [
        "tasks=[text]", f"output_root={out}", "run_date=2026-11-25",
        f"text.data.train={train}", f"text.data.val={val}", f"text.data.test={test}",
        "text.train.epochs=12", "text.train.batch_size=16", "text.train.max_failures=3",
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
    result = {"summary": summaries[0], **state, "seconds": time.time() - started}
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:5], fault="--no-fault" not in sys.argv[5:]), default=str))
