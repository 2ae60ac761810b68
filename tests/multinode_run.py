"""Helper run by test_multinode.py in its own process: a 3-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``), training spread over two nodes, one worker node removed mid-training.

    python tests/multinode_run.py OUTPUT_ROOT TRAIN VAL TEST   # prints one JSON line
"""

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from dlbatch.config import load_config
from dlbatch.runner import run_train


def main(out: str, train: str, val: str, test: str) -> dict:
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

    def remove_a_worker_node():
        deadline = time.time() + 300
        while time.time() < deadline:
            if len(list(storage.glob("checkpoint_*/meta.json"))) >= 2:
                try:
                    alive = list_actors(
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                    )
                except Exception:  # the state API can time out on a loaded machine: ask again
                    time.sleep(0.5)
                    continue
                state["worker_nodes"] = sorted({a.node_id for a in alive})
                for node in workers:
                    if node.node_id in state["worker_nodes"]:
                        cluster.remove_node(node)
                        state["removed_node"], state["removed_at"] = node.node_id, time.time()
                        return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_worker_node, daemon=True)
    remover.start()
    started = time.time()
    [summary] = run_train(cfg)
    remover.join(timeout=1)
    result = {"summary": summary, **state, "seconds": time.time() - started}
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:5]), default=str))
