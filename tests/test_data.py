"""Bad datasets fail fast with one line naming the path and the column; footers only, no Ray needed."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlbatch.config import JobConfig
from dlbatch.data import inspect_split
from dlbatch.errors import DataError

IMAGE_CFG = JobConfig().image
TEXT_CFG = JobConfig().text
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _text(n=3, **cols):
    base = {"id": list(range(n)), "text": ["a b"] * n, "label": ["x"] * n}
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


def _inspect(path, kind="text", cfg=None, needs_label=True):
    cfg = cfg or (TEXT_CFG if kind == "text" else IMAGE_CFG)
    return inspect_split("train", str(path), cfg, kind, needs_label)


def _cfg(base, **data):
    return base.model_copy(update={"data": base.data.model_copy(update=data)})


def test_good_split_is_described(tmp_path):
    _write(tmp_path / "d" / "part-0.parquet", _text(3))
    _write(tmp_path / "d" / "part-1.parquet", _text(2))
    (tmp_path / "d" / "_SUCCESS").write_text("")  # markers and hidden files are not data
    info = _inspect(tmp_path / "d")
    assert info.num_rows == 5 and len(info.files) == 2
    assert info.has_id and info.label_type == "string"


BAD_DATASETS = [
    ("missing path", lambda p: p / "nope", "no such file or directory"),
    ("directory without parquet files", lambda p: (p / "empty").mkdir() or p / "empty", "no Parquet files found"),
    ("not parquet", lambda p: (p / "x.parquet").write_text("hello,world\n") and p / "x.parquet", "not a readable Parquet file"),
    ("truncated parquet", "truncated", "not a readable Parquet file"),
    ("zero rows", lambda p: _write(p / "e.parquet", _text(2).slice(0, 0)), "dataset is empty (0 rows in 1 file(s))"),
    ("missing text column", lambda p: _write(p / "m.parquet", _text(text=None)), "missing column 'text'"),
    ("text column of ints", lambda p: _write(p / "t.parquet", _text(text=[1, 2, 3])), "column 'text' is int64, expected string text"),
    ("missing label column", lambda p: _write(p / "l.parquet", _text(label=None)), "missing label column 'label'"),
    ("float labels", lambda p: _write(p / "f.parquet", _text(label=[0.5, 1.5, 2.5])), "column 'label' is double, expected int or string labels"),
    ("mixed label types", "mixed", "column 'label' is int, other files"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "message"), BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS])
def test_bad_text_datasets_fail_with_one_clear_line(tmp_path, case, make, message):
    if make == "truncated":
        good = _write(tmp_path / "full.parquet", _text(100))
        path = tmp_path / "cut.parquet"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        good.unlink()
    elif make == "mixed":
        path = tmp_path / "d"
        _write(path / "a.parquet", _text(2, label=["x", "y"]))
        _write(path / "b.parquet", _text(2, label=[1, 2]))
    else:
        path = make(tmp_path)
    with pytest.raises(DataError) as err:
        _inspect(path)
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert str(tmp_path) in text  # names the path


def test_image_column_of_wrong_type(tmp_path):
    path = _write(tmp_path / "i.parquet", pa.table({"image": [1.0, 2.0], "label": [0, 1]}))
    with pytest.raises(DataError, match=r"column 'image' is double, expected image bytes"):
        _inspect(path, "image")


def test_image_struct_without_bytes_field(tmp_path):
    bad = pa.array([{"path": "a.png"}], pa.struct([("path", pa.string())]))
    path = _write(tmp_path / "s.parquet", pa.table({"image": bad, "label": [0]}))
    with pytest.raises(DataError, match=r"expected struct<bytes: binary, path: string>"):
        _inspect(path, "image")


def test_pixel_arrays_that_disagree_with_the_configured_shape(tmp_path):
    pixels = pa.array([np.zeros(32 * 32, np.uint8).tolist()] * 2, pa.list_(pa.uint8()))
    path = _write(tmp_path / "p.parquet", pa.table({"image": pixels, "label": [0, 1]}))
    with pytest.raises(DataError, match=r"pixel arrays have 1024 values, config expects 1x28x28 = 784"):
        _inspect(path, "image")


def test_missing_passthrough_column(tmp_path):
    path = _write(tmp_path / "p.parquet", _text(2))
    with pytest.raises(DataError, match="missing pass-through column 'region'"):
        _inspect(path, cfg=_cfg(TEXT_CFG, passthrough_columns=["region"]))


def test_score_split_needs_no_label(tmp_path):
    info = _inspect(_write(tmp_path / "s.parquet", _text(2, label=None)), needs_label=False)
    assert not info.has_label


def test_hive_partitions_are_read_and_can_be_restricted(tmp_path):
    for day, n in (("2026-11-24", 2), ("2026-11-25", 3)):
        _write(tmp_path / "t" / f"dt={day}" / "part-0.parquet", _text(n))
    assert _inspect(tmp_path / "t").num_rows == 5
    one = _inspect(tmp_path / "t", cfg=_cfg(TEXT_CFG, partition={"dt": "2026-11-25"}))
    assert one.num_rows == 3 and len(one.files) == 1
    with pytest.raises(DataError, match=r"no Parquet files found matching partition \{'dt': '2026-12-01'\}"):
        _inspect(tmp_path / "t", cfg=_cfg(TEXT_CFG, partition={"dt": "2026-12-01"}))
