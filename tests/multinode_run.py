"""Helper run by test_multinode.py in its own process: a 3-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``), training spread over two nodes, one worker node removed mid-training.

    python tests/multinode_run.py OUTPUT_ROOT TRAIN VAL TEST [--no-fault]   # prints one JSON line

``--no-fault`` trains on the same 3-node cluster without removing a node: bench/faults.py's baseline.
"""

import json
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
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = load_config(None, [
        "tasks=[text]", f"output_root={out}", "run_date=2026-11-25",
        f"text.data.train={train}", f"text.data.val={val}", f"text.data.test={test}",
        "text.train.epochs=10", "text.train.batch_size=32", "text.train.max_failures=3",
        "text.train.placement_strategy=STRICT_SPREAD",
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
        while time.time() < deadline:
            if registered_checkpoints(storage) >= 1:
                try:
                    hosting = train_worker_nodes()
                except psutil.Error:
                    hosting = []
                if hosting:
                    state["worker_nodes_hosting"] = len(hosting)
                    state["removed_node"], state["removed_at"] = hosting[0].node_id, time.time()
                    cluster.remove_node(hosting[0])
                    return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_worker_node, daemon=True)
    if fault:
        remover.start()
    started = time.time()
    [summary] = run_train(cfg)
    if fault:
        remover.join(timeout=1)
    result = {"summary": summary, **state, "seconds": time.time() - started}
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:5], fault="--no-fault" not in sys.argv[5:]), default=str))
