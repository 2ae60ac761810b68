"""Shared fixtures: one real local Ray cluster for the whole session, which the tests' subprocess jobs join
too (a private cluster costs seconds to start here; tests whose subject is a private cluster or its
lifecycle start their own), an S3 API server on loopback whose endpoint every process of that cluster
knows (as a cluster's nodes know their object store's credentials), and the demo data, made once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def s3_service():
    """moto's S3 API server on a free loopback port for the whole session: (environment for clients,
    a pyarrow filesystem on it)."""
    import socket
    import time

    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.time() < deadline and server.poll() is None, "moto server did not start"
        time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    yield env, fs
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster(s3_service):
    import ray

    from dlbatch.cluster import own_address

    # Told its own address, as dlbatch's local cluster is: a test's subprocess job may run a second cluster
    # on this host, and without it a killed controller's placement group would keep holding its CPUs. The
    # S3 endpoint reaches every process the cluster starts, as it would on a cluster's nodes.
    with own_address(**s3_service[0]):
        # More logical CPUs than cores on purpose: training workers hold CPUs for a whole fit and Ray Data
        # still needs some, or a fit would hang. Loopback only.
        ray.init(
            address="local",  # a new private cluster, never one that happens to run on this host
            num_cpus=6,
            # Logical GPUs, no CUDA: the GPU inference layout (an actor per GPU) is scheduled and run as on
            # a GPU node, with the model on CPU inside the actor (tests/test_pipeline.py).
            num_gpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
        )
    # A private local cluster has no spot nodes to drain: no preemption watcher per fit, as dlbatch's own
    # local cluster does (dlbatch/cluster.py); the jobs that join this cluster inherit the setting.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller polls its workers every 2 s, and a report waits for the poll: a fit of a few
    # short epochs spent seconds waiting (a fit's end came 2.8 s after its last batch, 1.0 s at 0.2 s;
    # bench/fit_overhead.py). Ray Train passes the setting from the driver to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_ray_env(ray_cluster, s3_service) -> dict[str, str]:
    """The environment of a subprocess job that joins the session's cluster, as `ray job submit` would
    have it join a running one (RAY_ADDRESS), with the S3 endpoint's client settings."""
    address = ray_cluster.get_runtime_context().gcs_address
    return {**os.environ, **s3_service[0], "RAY_ADDRESS": address}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Small demo datasets shared by the integration tests."""
    from dlbatch.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo-data")
    return {task: write_demo_data(root, task, train_rows=1500, seed=0) for task in ("image", "text")}


def config_for(tmp_path, task: str, demo_paths: dict, *overrides: str):
    """A JobConfig for one task over the shared demo data, writing under tmp_path."""
    from dlbatch.config import load_config

    data = [f"{task}.data.{split}={path}" for split, path in demo_paths[task].items()]
    return load_config(
        None, [f"tasks=[{task}]", f"output_root={tmp_path}", "run_date=2026-11-25", *data, *overrides]
    )


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback (SQLite backend, a local artifact root), stopped
    afterwards. Yields (tracking URI, a function that stops it early)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "mlflow"
    root.mkdir()
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)

    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri, stop
    stop()
    log.close()


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet, as in a new Ray worker); its last line of
    output."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.strip().splitlines()[-1]


os.environ.setdefault("RAY_DEDUP_LOGS", "1")
