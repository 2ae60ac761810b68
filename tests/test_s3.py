"""Object storage for real: data, Ray Train checkpoints and predictions on s3:// against an S3 API server
(moto's server mode) started on loopback by this test. Credentials and endpoint come from the standard
AWS environment variables, as they would on a cluster."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture
def s3_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.time() < deadline and server.poll() is None, "moto server did not start"
        time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir("nightly")
    yield env, fs
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_full_run_on_object_storage_with_resume(s3_server, demo_root):
    env, fs = s3_server
    for split, local in demo_root["text"].items():
        pafs.copy_files(local, f"nightly/data/text/{split}", destination_filesystem=fs)
    args = [
        sys.executable, "jobs/nightly.py", "--run-date=2026-11-25", "tasks=[text]", "output_root=s3://nightly/dlbatch",
        *[f"text.data.{s}=s3://nightly/data/text/{s}" for s in demo_root["text"]],
        "text.train.epochs=2", "text.train.batch_size=32",
    ]  # fmt: skip
    run_env = {**os.environ, **env}
    done = subprocess.run(args, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "[text] test accuracy" in done.stdout

    run = "nightly/dlbatch/runs/2026-11-25/text"
    assert fs.get_file_info(f"{run}/predictions/_SUCCESS").type == pafs.FileType.File
    assert fs.get_file_info(f"{run}/_SUCCESS").type == pafs.FileType.File
    preds = pads.dataset(f"{run}/predictions", filesystem=fs, format="parquet").to_table()
    assert preds.num_rows == pads.dataset(demo_root["text"]["score"], format="parquet").count_rows()
    ckpts = fs.get_file_info(pafs.FileSelector("nightly/dlbatch/ray_results/text-2026-11-25"))
    dirs = [
        i.base_name
        for i in ckpts
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    assert len(dirs) == 2  # one per epoch, in S3

    # More epochs for the same run: training resumes from the checkpoint that lives in S3.
    fs.delete_dir(run)
    more = subprocess.run([*args[:-2], "text.train.epochs=3", "text.train.batch_size=32"], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=500)  # fmt: skip
    assert more.returncode == 0, (more.stdout + more.stderr)[-3000:]
    import json

    with fs.open_input_stream(f"{run}/summary.json") as src:
        history = json.loads(src.read())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[2]["resumed_from_epoch"] == 1
