"""Real-world inputs end to end: hive partitions, plain PNG bytes, no id column, bad rows in every split.

Bad rows never crash a run and are never dropped silently: every row read is either used or rejected with
a reason, and predictions join back to the inputs.
"""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dlbatch.config import load_config
from dlbatch.demo import make_image_table, make_text_table
from dlbatch.errors import DataError
from dlbatch.flow import run_nightly, run_train

REPO = Path(__file__).parents[1]
GARBAGE = b"\x89PNG\r\n garbage"


def _jpeg_rgb(h: int = 40, w: int = 33) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


RGB_JPEG = _jpeg_rgb()


def _image_split(
    root: Path, split: str, n: int, seed: int, bad_rows: dict[int, tuple], with_labels=True
) -> Path:
    """Hive layout dt=.../part-0.parquet; image as plain binary in column 'img'; no id column."""
    table = make_image_table(n, seed=seed, with_labels=with_labels)
    images = pc.struct_field(table["image"], "bytes").to_pylist()
    labels = table["label"].to_pylist() if with_labels else None
    for i, (image, label) in bad_rows.items():  # ... keeps the generated value
        if image is not ...:
            images[i] = image
        if with_labels and label is not ...:
            labels[i] = label
    cols = {"img": pa.array(images, pa.binary())}
    if with_labels:
        cols["digit"] = pa.array(labels, pa.int64())
    for day, part in (("2026-11-24", slice(0, 5)), ("2026-11-25", slice(0, n))):
        out = root / split / f"dt={day}"
        out.mkdir(parents=True)
        pq.write_table(pa.table(cols).slice(part.start, part.stop - part.start), out / "part-0.parquet")
    return root / split


def test_dirty_image_data_is_routed_to_rejects_and_conserved(ray_cluster, tmp_path):
    src = tmp_path / "data"
    garbage = GARBAGE
    splits = {
        "train": _image_split(
            src, "train", 900, 1, {0: (garbage, ...), 1: (None, ...), 2: (..., None), 3: (RGB_JPEG, ...)}
        ),
        "val": _image_split(src, "val", 150, 2, {5: (None, ...)}),
        "test": _image_split(src, "test", 150, 3, {0: (garbage, ...), 9: (..., 11)}),
        "score": _image_split(src, "score", 300, 4, {4: (garbage, ...), 8: (None, ...)}, with_labels=False),
    }
    overrides = [f"image.data.{s}={p}" for s, p in splits.items()] + [
        "tasks=[image]", f"output_root={tmp_path / 'out'}", "run_date=2026-11-25",
        "image.data.partition={dt: '2026-11-25'}", "image.data.label_column=digit", "image.data.num_classes=10",
        "image.image.column=img", "image.train.epochs=1", "image.train.num_workers=1", "image.train.batch_size=16", "quality_margin=0",
    ]  # fmt: skip
    [summary] = run_nightly(load_config(None, overrides))

    rows = summary["rows"]
    for split, counts in rows.items():
        assert counts["read"] == counts["used"] + counts["rejected"], split
    assert rows["train"] == {
        "read": 900,
        "used": 897,
        "rejected": 3,
    }  # the RGB JPEG is converted, not rejected
    assert rows["val"] == {"read": 150, "used": 149, "rejected": 1}
    assert rows["test"] == {"read": 150, "used": 148, "rejected": 2}
    assert rows["score"] == {"read": 300, "used": 298, "rejected": 2}

    run_dir = tmp_path / "out" / "runs" / "2026-11-25" / "image"
    reasons = sorted(pads.dataset(run_dir / "rejects" / "train").to_table()["reject_reason"].to_pylist())
    assert "null image" in reasons and "null label" in reasons
    assert any(r.startswith("undecodable image") for r in reasons)
    test_reasons = pads.dataset(run_dir / "rejects" / "test").to_table()["reject_reason"].to_pylist()
    assert sorted(test_reasons)[1] == "unknown label 11" and sorted(test_reasons)[0].startswith("undecodable")
    score_rejects = pads.dataset(run_dir / "rejects" / "score").to_table()
    assert set(score_rejects.column_names) == {"id", "source", "reject_reason"}
    assert all(s.endswith("dt=2026-11-25/part-0.parquet") for s in score_rejects["source"].to_pylist())

    # No id column: ids are Ray Data's row hash, so predictions + rejects join back to the input rows exactly.
    import ray.data

    inputs = ray.data.read_parquet(str(splits["score"] / "dt=2026-11-25"), include_row_hash=True).to_pandas()
    preds = pads.dataset(run_dir / "predictions").to_table().to_pandas()
    out_ids = list(preds["id"]) + score_rejects["id"].to_pylist()
    assert len(out_ids) == len(set(out_ids)) == len(inputs)
    assert set(out_ids) == set(inputs["row_hash"])

    # The GPU layout on CPUs: PNGs decoded in a task stage, an actor pool only runs the model. Same
    # predictions, same rejects with the same reasons and sources.
    from dlbatch.flow import run_predict

    pool = ["force=true", "image.predict.compute=actors", "image.predict.preprocess=tasks"]
    [again] = run_predict(load_config(None, overrides + pool))
    assert again["rows"]["score"] == rows["score"]
    preds_again = pads.dataset(run_dir / "predictions").to_table().to_pandas()
    pd.testing.assert_frame_equal(
        preds.drop(columns="probs").sort_values("id").reset_index(drop=True),
        preds_again[preds.columns].drop(columns="probs").sort_values("id").reset_index(drop=True),
        check_exact=False,
        atol=1e-5,
    )
    rejects_again = pads.dataset(run_dir / "rejects" / "score").to_table()
    assert sorted(rejects_again.to_pylist(), key=str) == sorted(score_rejects.to_pylist(), key=str)


def test_too_many_rejects_fail_the_run_after_writing_them(ray_cluster, tmp_path):
    table = make_text_table(200, seed=5)
    texts = table["text"].to_pylist()
    for i in range(0, 200, 5):  # 20% empty documents
        texts[i] = "  ...  "
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    paths = {}
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(table, tmp_path / split / "part-0.parquet")
        paths[split] = tmp_path / split
    cfg = load_config(
        None,
        [f"text.data.{s}={p}" for s, p in paths.items()]
        + [
            "tasks=[text]",
            f"output_root={tmp_path / 'out'}",
            "run_date=2026-11-25",
            "max_reject_fraction=0.1",
        ],
    )
    with pytest.raises(DataError) as err:
        run_train(cfg)
    assert "text/train: 40 of 200 rows rejected (20.0%), above max_reject_fraction 10.0%" in str(err.value)
    rejects = pads.dataset(tmp_path / "out" / "runs" / "2026-11-25" / "text" / "rejects" / "train").to_table()
    assert rejects.num_rows == 40
    assert set(rejects["reject_reason"].to_pylist()) == {"empty text"}
    assert sorted(rejects["id"].to_pylist()) == [f"doc-{i:07d}" for i in range(0, 200, 5)]


def test_a_bad_second_task_fails_the_job_in_one_line_before_ray_starts(demo_root, tmp_path):
    """Both tasks configured, the image task's data fine, the text task's training file not Parquet."""
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    good = demo_root["text"]
    image = [f"image.data.{s}={p}" for s, p in demo_root["image"].items()]
    done = subprocess.run(
        [sys.executable, "jobs/nightly.py", "tasks=[image,text]", *image, f"text.data.train={bad}",
         f"text.data.val={good['val']}", f"text.data.test={good['test']}", f"text.data.score={good['score']}",
         f"output_root={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dlbatch: error: {bad}: not a readable Parquet file (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)"
    ]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written: not even the image task's


def test_a_second_task_whose_labels_are_out_of_range_fails_before_the_first_trains(
    ray_cluster, demo_root, tmp_path
):
    """Label values are checked with Ray Data (not from the footers), still before any task trains."""
    table = pq.read_table(demo_root["text"]["train"])
    labels = [0] * (table.num_rows - 1) + [7]
    bad = tmp_path / "text-train"
    bad.mkdir()
    pq.write_table(
        table.drop(["label"]).append_column("label", pa.array(labels, pa.int64())), bad / "p.parquet"
    )
    text = {**demo_root["text"], "train": bad}
    cfg = load_config(None, [
        "tasks=[image,text]", f"output_root={tmp_path / 'out'}", "run_date=2026-11-25", "text.data.num_classes=4",
        *[f"image.data.{s}={p}" for s, p in demo_root["image"].items()],
        *[f"text.data.{s}={p}" for s, p in text.items()],
    ])  # fmt: skip
    with pytest.raises(DataError) as err:
        run_nightly(cfg)
    assert str(err.value) == (
        f"{bad}: column 'label' has labels in 0..7, outside the configured 4 classes (0..3)"
    )
    assert not (
        tmp_path / "out" / "ray_results" / "image-2026-11-25"
    ).exists()  # the image task never trained
    assert not (tmp_path / "out" / "runs" / "2026-11-25" / "image" / "model").exists()


def test_train_labels_outside_the_configured_classes_fail_fast(ray_cluster, tmp_path):
    from dlbatch.context import RunContext
    from dlbatch.ingest import check_data, learn

    table = make_image_table(20, seed=1)
    table = table.set_column(2, "label", pa.array([0] * 19 + [12], pa.int64()))
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(table, tmp_path / split / "p.parquet")
    cfg = load_config(
        None,
        [f"image.data.{s}={tmp_path / s}" for s in ("train", "val", "test")] + ["image.data.num_classes=10"],
    )
    with pytest.raises(
        DataError, match=r"train: column 'label' has labels in 0\.\.12, outside the configured 10 classes"
    ):
        ctx = RunContext(cfg, "image", "train")
        learn(ctx, check_data(ctx))
