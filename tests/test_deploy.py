"""deploy/: the KubeRay RayJob and the nightly CronJob are valid YAML with the fields they need."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).parents[1] / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_rayjob_fields():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "RUN_DATE" in job["metadata"]["name"]  # one name per night = one submission per night
    spec = job["spec"]
    assert (
        spec["entrypoint"].startswith("python jobs/nightly.py")
        and "--run-date RUN_DATE" in spec["entrypoint"]
    )
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    containers = [
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
        gpu["template"]["spec"]["containers"][0],
    ]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token is a secret, never inline
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert_a_data_group_from_zero(cluster, spec["entrypoint"])


def assert_a_data_group_from_zero(cluster: dict, entrypoint: str) -> None:
    """A CPU-only group, from zero, labelled as the job's config looks for it, which the job routes to."""
    from dlbatch.config import ClusterConfig

    key, value = ClusterConfig().data_label.split("=")
    [cpu] = [g for g in cluster["workerGroupSpecs"] if g.get("labels", {}).get(key) == value]
    assert cpu["minReplicas"] == 0 and cpu["maxReplicas"] >= 1
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "cluster.data_nodes=require" in entrypoint and cluster["autoscalerOptions"]["version"] == "v2"


def test_cronjob_creates_one_dated_rayjob_per_night():
    cron = _load("cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert "kubectl create" in script and "date -u +%F" in script and "/manifests/rayjob.yaml" in script


def test_the_image_the_manifests_run_is_built_on_the_ray_version_they_pin():
    import re

    root = DEPLOY.parent
    base = re.search(r"^FROM rayproject/ray:(\S+)", (root / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile builds on Ray's official image"
    tag = base.group(1)
    image_version = tag.split("-")[0]
    assert tag.endswith("-gpu") and "-py311" in tag  # the GPU variant, the Python the suite runs on
    ray_version = _load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    assert image_version == ray_version
    # The dependency line itself (tomllib is Python 3.11+, the project supports 3.10).
    [requirement] = re.findall(r'^\s*"(ray\[[^"]*)",', (root / "pyproject.toml").read_text(), re.M)
    low = re.search(r">=\s*([\d.]+)", requirement).group(1)
    high = re.search(r"<\s*([\d.]+)", requirement).group(1)
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(image_version) < as_tuple(high), (requirement, image_version)
