"""Object storage for real: data, Ray Train checkpoints and predictions on s3:// against an S3 API server
(moto's server mode, started on loopback for the session: tests/conftest.py). Credentials and endpoint
come from the standard AWS environment variables, in the driver (set here, as a job's environment sets
them) and in every process of the session's cluster, as they would on a cluster's nodes."""

import json

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from dlbatch.config import load_config
from dlbatch.flow import run_nightly


@pytest.mark.slow
def test_full_run_on_object_storage_with_resume(s3_service, ray_cluster, demo_root, monkeypatch):
    env, fs = s3_service
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fs.create_dir("nightly")
    for split, local in demo_root["text"].items():
        pafs.copy_files(local, f"nightly/data/text/{split}", destination_filesystem=fs)
    args = [
        "run_date=2026-11-25", "tasks=[text]", "output_root=s3://nightly/dlbatch", "text.train.batch_size=32",
        *[f"text.data.{s}=s3://nightly/data/text/{s}" for s in demo_root["text"]],
    ]  # fmt: skip
    [summary] = run_nightly(load_config(None, [*args, "text.train.epochs=2"]))
    assert summary["verdict"]["status"] == "promoted", summary["verdict"]

    run = "nightly/dlbatch/runs/2026-11-25/text"
    assert fs.get_file_info(f"{run}/predictions/_SUCCESS").type == pafs.FileType.File
    assert fs.get_file_info(f"{run}/_SUCCESS").type == pafs.FileType.File
    assert fs.get_file_info("nightly/dlbatch/models/text/champion.json").type == pafs.FileType.File
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
    run_nightly(load_config(None, [*args, "text.train.epochs=3"]))
    with fs.open_input_stream(f"{run}/summary.json") as src:
        history = json.loads(src.read())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[2]["resumed_from_epoch"] == 1
