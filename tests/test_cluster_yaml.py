"""cluster.yaml: the fields the Ray cluster launcher needs, and our invariants (GPU workers scale from 0,
dashboard on loopback, token auth on every node, the project installed by setup commands)."""

from pathlib import Path

import yaml

CLUSTER = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())


def test_launcher_fields():
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in CLUSTER, key
    assert CLUSTER["head_node_type"] in CLUSTER["available_node_types"]
    for node_type in CLUSTER["available_node_types"].values():
        assert "node_config" in node_type and "resources" in node_type


def test_gpu_workers_autoscale_from_zero():
    workers = {k: v for k, v in CLUSTER["available_node_types"].items() if k != CLUSTER["head_node_type"]}
    gpu = [v for v in workers.values() if v["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in gpu)


def test_cpu_workers_for_data_work_autoscale_from_zero_with_the_label_the_job_looks_for():
    from dlbatch.config import ClusterConfig

    key, value = ClusterConfig().data_label.split("=")
    workers = CLUSTER["available_node_types"].values()
    [data] = [v for v in workers if v.get("labels", {}).get(key) == value]
    assert data["min_workers"] == 0 and data["max_workers"] >= 1
    assert data["node_config"]["InstanceType"].startswith(("c", "m"))  # a CPU instance family


def test_dashboard_is_not_public_and_token_auth_is_on():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (CLUSTER["head_start_ray_commands"], CLUSTER["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any("auth_token" in target for target in CLUSTER["file_mounts"])


def test_setup_installs_the_project():
    assert any("pip install" in c and "dlbatch" in c for c in CLUSTER["setup_commands"])
    assert "." in CLUSTER["file_mounts"].values()
