"""Layouts real exports come in: labels as Hive partition keys (Spark's ``partitionBy("label")``),
dictionary-encoded columns (pandas categoricals), duplicate ids in the score split, labels that differ only
by case. Real Parquet files, the session's Ray."""

import logging

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dlbatch.config import TextTaskConfig, load_config
from dlbatch.data import inspect_split, read_split
from dlbatch.demo import make_text_table
from dlbatch.errors import DataError
from dlbatch.flow import run_nightly


def _partitioned_by_label(root, table: pa.Table, rename: dict[int, str] | None = None):
    """``root/label=<value>/part-0.parquet`` without a label column, as partitionBy writes it; ``rename``
    moves single rows to another label value (a case variant, say)."""
    labels = [str(v) for v in table["label"].to_pylist()]
    for i, value in (rename or {}).items():
        labels[i] = value
    frame = table.drop(["label"]).to_pandas()
    frame["text"] = frame["text"].astype("category")  # dictionary-encoded in Parquet
    for value in sorted(set(labels)):
        part = root / f"label={value}"
        part.mkdir(parents=True)
        rows = frame[[label == value for label in labels]]
        rows.to_parquet(part / "part-0.parquet", index=False)
    return root


def test_a_spark_style_export_trains_and_scores_with_warnings_for_ambiguous_ids_and_labels(
    ray_cluster, tmp_path, caplog
):
    src = tmp_path / "export"
    train = make_text_table(1500, seed=11)
    sports = [i for i, v in enumerate(train["label"].to_pylist()) if v == "sports"][:3]
    _partitioned_by_label(src / "train", train, {i: "Sports" for i in sports})
    _partitioned_by_label(src / "val", make_text_table(200, seed=12))
    _partitioned_by_label(src / "test", make_text_table(200, seed=13))
    score = make_text_table(300, seed=14, with_labels=False).to_pandas()
    score.loc[[1, 2, 3], "id"] = score.loc[[10, 20, 30], "id"].to_numpy()  # three ids twice
    score = score.astype({"id": "category", "text": "category"})
    (src / "score").mkdir()
    score.to_parquet(src / "score" / "part-0.parquet", index=False)
    assert pa.types.is_dictionary(pq.read_schema(src / "score" / "part-0.parquet").field("id").type)

    cfg = load_config(None, [
        "tasks=[text]", f"output_root={tmp_path / 'out'}", "run_date=2026-11-25", "text.train.epochs=3", "text.train.batch_size=32",
        *[f"text.data.{s}={src / s}" for s in ("train", "val", "test", "score")],
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dlbatch"):
        [summary] = run_nightly(cfg)

    assert summary["verdict"]["status"] == "promoted"
    assert summary["test_accuracy"] > 0.6
    assert summary["metrics"]["label_names"] == ["Sports", "business", "health", "science", "sports"]
    assert summary["metrics"]["label_variants"] == [["Sports", "sports"]]
    assert summary["metrics"]["duplicate_ids"] == {
        "ids": 3,
        "rows": 6,
        "examples": sorted(score.loc[[10, 20, 30], "id"].astype(str)),
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "text: labels 'Sports', 'sports' differ only by case or surrounding spaces; they are kept as 2 classes"
        in warnings
    )
    assert any(w.startswith("text: 3 ids appear on more than one score row (6 rows") for w in warnings)
    # Every input row has exactly one prediction row, duplicates included; ids come back as plain strings.
    preds = pads.dataset(tmp_path / "out/runs/2026-11-25/text/predictions").to_table()
    assert preds.schema.field("id").type == pa.string()
    assert sorted(preds["id"].to_pylist()) == sorted(score["id"].astype(str))


def test_partition_labels_are_typed_as_configured(ray_cluster, tmp_path):
    table = make_text_table(40, seed=3).drop(["label"])
    for value in ("0", "3"):
        (tmp_path / "d" / f"label={value}").mkdir(parents=True)
        pq.write_table(table, tmp_path / "d" / f"label={value}" / "part-0.parquet")
    task_cfg = TextTaskConfig()

    def typed(label_type: str) -> TextTaskConfig:
        return task_cfg.model_copy(
            update={"data": task_cfg.data.model_copy(update={"label_type": label_type})}
        )

    info = inspect_split("train", str(tmp_path / "d"), task_cfg, "text", needs_label=True)
    assert info.label_type == "int" and info.has_label
    labels = read_split(info, columns=["text", "label"]).take_batch(200, batch_format="pyarrow")["label"]
    assert labels.type == pa.int64() and sorted(set(labels.to_pylist())) == [0, 3]

    as_string = typed("string")
    info = inspect_split("train", str(tmp_path / "d"), as_string, "text", needs_label=True)
    assert info.label_type == "string"
    assert sorted(set(read_split(info, columns=["label"]).to_pandas()["label"])) == ["0", "3"]

    (tmp_path / "d" / "label=other").mkdir()
    pq.write_table(table, tmp_path / "d" / "label=other" / "part-0.parquet")
    as_int = typed("int")
    with pytest.raises(DataError) as err:
        inspect_split("train", str(tmp_path / "d"), as_int, "text", needs_label=True)
    assert str(err.value) == (
        f"{tmp_path}/d/label=other/part-0.parquet: partition key label='other' is not an int label "
        "(data.label_type=int)"
    )


def test_a_categorical_text_column_is_read_as_strings(ray_cluster, tmp_path):
    frame = pd.DataFrame(
        {"id": ["a", "b", "c"], "text": pd.Categorical(["x y", "z", "x y"]), "label": [0, 1, 0]}
    )
    frame.to_parquet(tmp_path / "p.parquet", index=False)
    task_cfg = TextTaskConfig()
    info = inspect_split("train", str(tmp_path / "p.parquet"), task_cfg, "text", needs_label=True)
    batch = read_split(info, columns=["id", "text", "label"]).take_batch(3, batch_format="pyarrow")
    assert batch.schema.field("text").type == pa.string() and batch["text"].to_pylist() == ["x y", "z", "x y"]
