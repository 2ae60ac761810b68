"""Helper run by test_multinode.py in its own process: a 2-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``) whose second node carries the data-node label, and a text night trained,
evaluated and scored on it. Prints one JSON line: on which node each Ray Data task and each training
worker and inference actor ran (from Ray's state API).

    python tests/data_nodes_run.py OUTPUT_ROOT TRAIN VAL TEST SCORE
"""

import json
import socket
import sys

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from dlbatch.config import load_config
from dlbatch.flow import run_nightly


def main(out: str, train: str, val: str, test: str, score: str) -> dict:
    with socket.socket() as probe:  # the dashboard (the state API's server) on a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": port},
    )  # fmt: skip
    data_node = cluster.add_node(num_cpus=2, labels={"dlbatch-role": "data"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    cfg = load_config(None, [
        "tasks=[text]", f"output_root={out}", "run_date=2026-11-25",
        f"text.data.train={train}", f"text.data.val={val}", f"text.data.test={test}",
        f"text.data.score={score}", "text.train.epochs=1", "text.train.num_workers=2",
        "text.train.batch_size=32", "quality_margin=0",
    ])  # fmt: skip
    [summary] = run_nightly(cfg)
    tasks = [t for t in list_tasks(detail=True, limit=10_000, raise_on_missing_output=False)
             if t.type == "NORMAL_TASK"]  # fmt: skip
    actors = list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    result = {
        "data_node": data_node.node_id,
        "status": summary["verdict"]["status"],
        "data_tasks": sorted({(t.name, t.node_id == data_node.node_id) for t in tasks if "Map" in t.name or "Read" in t.name}),
        "train_workers_on_data_node": [a.node_id == data_node.node_id for a in actors if a.class_name == "RayTrainWorker"],
        "val_ranks": [h["val_ranks"] for h in summary["history"]],
    }  # fmt: skip
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:6]), default=str))
