"""Object storage for real: data, Ray Train checkpoints and predictions on s3:// against an S3 API server
(moto's server mode, started on loopback for the session: tests/conftest.py). Credentials and endpoint
come from the standard AWS environment variables, in the job and in every process of the cluster it
joins, as they would on a cluster."""

import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_full_run_on_object_storage_with_resume(s3_service, shared_ray_env, demo_root):
    _, fs = s3_service
    fs.create_dir("nightly")
    for split, local in demo_root["text"].items():
        pafs.copy_files(local, f"nightly/data/text/{split}", destination_filesystem=fs)
    args = [
        sys.executable, "jobs/nightly.py", "--run-date=2026-11-25", "tasks=[text]", "output_root=s3://nightly/dlbatch",
        *[f"text.data.{s}=s3://nightly/data/text/{s}" for s in demo_root["text"]],
        "text.train.epochs=2", "text.train.batch_size=32",
    ]  # fmt: skip
    run_env = shared_ray_env
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
