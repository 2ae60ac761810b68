"""The front door: `ray start --head` on loopback, `ray job submit` with token auth, outputs checked."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

REPO = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate Ray head (its own GCS and dashboard ports) stopped with its own process group."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    gcs, dash, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=6", "--include-dashboard=true",
         f"--temp-dir={temp_dir}",
         # Own agent ports: the test session's local Ray already holds the defaults on this host.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    # Ready = the job server answers (the dashboard port opens before the job agent registers).
    deadline = time.time() + 120
    while True:
        if head.poll() is not None:
            pytest.fail(f"ray start exited: {head.stdout.read().decode()[-2000:]}")
        probe = subprocess.run([ray_bin, "job", "list", f"--address={address}"], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            pytest.fail(f"job server not ready: {probe.stderr.decode()[-1000:]}")
        time.sleep(2)
    yield ray_bin, address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # a graceful stop took ~30 s; nothing of this head outlives the test anyway
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_nightly_job(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    out = tmp_path / "out"
    cmd = [
        ray_bin, "job", "submit", f"--address={address}", "--submission-id=dlbatch-test-2026-11-25",
        # The job's runtime env sets Ray Data's log level itself, as a user may: the job keeps it (Ray refuses
        # a variable named in both the job's and the driver's runtime env, dlbatch/cluster.py).
        f"--working-dir={REPO}", '--runtime-env-json={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}',
        "--", "python", "jobs/nightly.py", "--run-date=2026-11-25",
        "tasks=[text]", "demo_rows=1000", "text.train.epochs=1", "text.train.num_workers=1",
        "text.train.decay=constant", "text.train.warmup_fraction=0", "text.train.lr_scaling=none",  # the peak, throughout
        "text.train.batch_size=16", f"output_root={out}",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "[text] test accuracy" in log
    # The epoch line that `ray job logs -f` users follow, once (a print() in a worker would show twice).
    assert log.count("[text] epoch 1/1: train_loss") == 1, log[-3000:]
    assert "Reporting training result" not in log  # Ray Train's per-report line with every metric, per rank
    assert "succeeded" in log
    assert "the job's runtime env sets PYTHONWARNINGS or RAY_DATA_LOG_LEVEL itself; kept" in log
    assert "Starting execution of Dataset" not in log  # the job's level reached its Ray Data actors
    pred_dir = out / "runs" / "2026-11-25" / "text" / "predictions"
    assert (pred_dir / "_SUCCESS").exists()
    assert pads.dataset(pred_dir, format="parquet").count_rows() == 333

    # A retried trigger with the same submission id is rejected, not run twice.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode != 0
    assert "Job with submission_id dlbatch-test-2026-11-25 already exists" in again.stdout + again.stderr
