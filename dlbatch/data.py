"""Dataset checks and readers.

``inspect_split`` reads Parquet footers only (no data) and fails fast with one line naming the path and the
column. ``read_split`` returns a Ray Dataset over exactly the files that were checked.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dlbatch.config import TaskConfig, TextConfig
from dlbatch.errors import DataError
from dlbatch.preprocess import PATH_COL, ROW_HASH_COL

_BINARY = (pa.types.is_binary, pa.types.is_large_binary)
_STRING = (pa.types.is_string, pa.types.is_large_string)
_LIST = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)


def _is(t: pa.DataType, checks: tuple) -> bool:
    return any(check(t) for check in checks)


def resolve_path(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, file://)."""
    if filesystem is not None:
        return filesystem, path.split("://", 1)[-1]
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot open ({err})") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


@dataclass
class SplitInfo:
    """What the footer scan learned about one split."""

    name: str
    path: str
    filesystem: pafs.FileSystem
    files: list[str]
    num_rows: int
    schema: pa.Schema
    has_id: bool
    has_label: bool
    label_type: str | None  # "int" | "string" | None
    extra: dict[str, Any] = field(default_factory=dict)
    file_rows: list[int] = field(default_factory=list)  # rows per file, in the order of ``files``


def _list_parquet_files(fs: pafs.FileSystem, root: str, display: str, partition: dict[str, str]) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{display}: no such file or directory")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        selector = pafs.FileSelector(root, recursive=True)
        files = sorted(
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File
            and not any(p.startswith(("_", ".")) for p in f.path[len(root) :].split("/"))
        )
    if partition:
        wanted = {f"{k}={v}" for k, v in partition.items()}
        files = [f for f in files if wanted <= set(f[len(root) :].split("/"))]
    if not files:
        where = f" matching partition {partition}" if partition else ""
        raise DataError(f"{display}: no Parquet files found{where}")
    return files


def _read_schema(fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        reason = str(err).splitlines()[0]
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None


def _value_type(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column (pandas categorical, Spark/Hive dictionary pages) as its value type."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _check_feature(
    info_path: str, schema: pa.Schema, kind: str, column: str, image_shape: tuple[int, int, int]
) -> None:
    if column not in schema.names:
        raise DataError(f"{info_path}: missing column {column!r} (columns: {', '.join(schema.names)})")
    t = _value_type(schema.field(column).type)
    if kind == "text":
        if not _is(t, _STRING):
            raise DataError(f"{info_path}: column {column!r} is {t}, expected string text")
        return
    if pa.types.is_struct(t):
        if t.get_field_index("bytes") < 0 or not _is(t.field("bytes").type, _BINARY):
            raise DataError(
                f"{info_path}: column {column!r} is {t}, expected struct<bytes: binary, path: string>"
            )
        return
    if _is(t, _BINARY):
        return
    if _is(t, _LIST) and pa.types.is_integer(t.value_type):
        if pa.types.is_fixed_size_list(t) and t.list_size != image_shape[0] * image_shape[1] * image_shape[2]:
            raise DataError(
                f"{info_path}: column {column!r} holds {t.list_size} pixels per row, config expects "
                f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]}"
            )
        return
    raise DataError(
        f"{info_path}: column {column!r} is {t}, expected image bytes, a {{bytes, path}} struct or a list of uint8 pixels"
    )


def _check_pixel_lengths(fs: pafs.FileSystem, path: str, column: str, shape: tuple[int, int, int]) -> None:
    """Config/data disagreement on pixel arrays is a dataset error, caught on the first rows of a file."""
    with fs.open_input_file(path) as handle:
        pf = pq.ParquetFile(handle)
        if pf.metadata.num_rows == 0:
            return
        first = next(pf.iter_batches(batch_size=16, columns=[column])).column(0)
    lengths = set(pc.drop_null(pc.list_value_length(first)).to_pylist())
    expected = shape[0] * shape[1] * shape[2]
    if lengths and lengths != {expected}:
        raise DataError(
            f"{path}: column {column!r} pixel arrays have {sorted(lengths)[0]} values, config expects "
            f"{shape[0]}x{shape[1]}x{shape[2]} = {expected}"
        )


def inspect_split(
    name: str,
    path: str,
    task_cfg: TaskConfig,
    kind: str,
    needs_label: bool,
    filesystem: pafs.FileSystem | None = None,
) -> SplitInfo:
    """Check a split from its Parquet footers: files exist and are Parquet, columns present with usable types."""
    data_cfg = task_cfg.data
    fs, root = resolve_path(path, filesystem)
    files = _list_parquet_files(fs, root, path, data_cfg.partition)
    feature = task_cfg.feature_column
    shape = None
    if kind == "image":
        img = task_cfg.image
        shape = (img.channels, img.height, img.width)
    label_col = data_cfg.label_column
    total, schema, label_type, file_rows = 0, None, None, []
    partition_labels: dict[str, str] = {}  # file -> its label=<value> partition key
    for f in files:
        file_schema, rows = _read_schema(fs, f)
        file_rows.append(rows)
        _check_feature(f, file_schema, kind, feature, shape)
        key = re.search(rf"(?:^|/){re.escape(label_col)}=([^/]*)/", f[len(root) :] if f != root else "")
        if label_col not in file_schema.names and key:
            partition_labels[f] = unquote(key.group(1))
        elif needs_label and label_col not in file_schema.names:
            raise DataError(
                f"{f}: missing label column {label_col!r} (columns: {', '.join(file_schema.names)})"
            )
        if label_col in file_schema.names:
            t = _value_type(file_schema.field(label_col).type)
            this = "int" if pa.types.is_integer(t) else "string" if _is(t, _STRING) else None
            if this is None:
                raise DataError(f"{f}: column {label_col!r} is {t}, expected int or string labels")
            if label_type not in (None, this):
                raise DataError(
                    f"{f}: column {label_col!r} is {this}, other files of {path} have {label_type}"
                )
            label_type = this
        for col in data_cfg.passthrough_columns:
            if col not in file_schema.names:
                raise DataError(f"{f}: missing pass-through column {col!r}")
        schema = schema or file_schema
        total += rows
    if total == 0:
        raise DataError(f"{path}: dataset is empty (0 rows in {len(files)} file(s))")
    extra: dict[str, Any] = {}
    if partition_labels:
        if len(partition_labels) < len(files) and (needs_label or label_type is not None):
            unlabeled = next(f for f in files if f not in partition_labels)
            raise DataError(f"{unlabeled}: no label column {label_col!r} and no {label_col}=<value> partition key, "
                            f"unlike other files of {path}")  # fmt: skip
        label_type = _partition_label_type(partition_labels, label_col, data_cfg.label_type)
        extra["label_partition"] = (label_col, label_type)
    dictionaries = [f.name for f in schema if pa.types.is_dictionary(f.type)]
    if dictionaries:
        extra["dictionary_columns"] = dictionaries
    if kind == "image" and _is(schema.field(feature).type, _LIST):
        _check_pixel_lengths(fs, files[0], feature, shape)
    return SplitInfo(
        name=name,
        path=path,
        filesystem=fs,
        files=files,
        num_rows=total,
        schema=schema,
        has_id=data_cfg.id_column in schema.names,
        has_label=label_col in schema.names or bool(partition_labels),
        label_type=label_type,
        extra=extra,
        file_rows=file_rows,
    )


def _partition_label_type(values: dict[str, str], label_col: str, configured: str) -> str:
    """The type of labels from partition keys: as configured, or int when every value is an integer."""
    ints = {f: v for f, v in values.items() if re.fullmatch(r"-?\d+", v)}
    if configured == "string" or (configured == "auto" and len(ints) < len(values)):
        return "string"
    if len(ints) < len(values):
        f = next(f for f in values if f not in ints)
        raise DataError(
            f"{f}: partition key {label_col}={values[f]!r} is not an int label (data.label_type=int)"
        )
    return "int"


def read_split(info: SplitInfo, columns: list[str] | None = None, shuffle_seed: int | None = None):
    """Ray Dataset over the split's checked files, with source path and (without an id column) a row hash.

    ``shuffle_seed``: the files in a new order on every execution of the dataset (every epoch of a fit),
    drawn from this seed and the execution's index."""
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data.datasource import Partitioning

    # Ray Data's V2 Parquet reader spent seconds per read listing and sampling files on a 2-core machine
    # (the legacy reader a fraction of one), and a streamed split is read again every epoch. The reader is
    # picked when the dataset is made: only this one gets it, the process's own setting is left as it was.
    # The legacy reader's file-sampling bar is drawn on a terminal only: in a job's log every update of it
    # is a line (the dataset's own progress is logged by Ray Data, which hides it at its default level).
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, saved[1] and sys.stderr.isatty()
    # Ray Data adds Hive partition keys (dt=..., label=...) as string columns; a label taken from them is
    # typed here, the way the footer scan decided.
    label_col, label_type = info.extra.get("label_partition", (None, None))
    types = {label_col: int} if label_type == "int" else {}
    try:
        ds = ray.data.read_parquet(
            info.files,
            filesystem=info.filesystem,
            columns=columns,
            include_paths=True,
            include_row_hash=not info.has_id,
            partitioning=Partitioning("hive", field_types=types),
            shuffle=None
            if shuffle_seed is None
            else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True),
        )
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    ds.context.enable_progress_bars = saved[1]
    wanted = set(info.extra.get("dictionary_columns", ())) & set(columns or info.schema.names)
    if wanted:  # read as their value type: every later stage sees plain strings, ints, bytes
        ds = ds.map_batches(
            _decode_dictionaries, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
        )
    return ds


def _decode_dictionaries(batch: pa.Table) -> pa.Table:
    for i, f in enumerate(batch.schema):
        if pa.types.is_dictionary(f.type):
            batch = batch.set_column(i, f.name, batch.column(i).cast(f.type.value_type))
    return batch


def split_columns(info: SplitInfo, task_cfg: TaskConfig, with_label: bool) -> list[str]:
    """The columns preprocessing needs (column projection keeps reads small)."""
    data_cfg = task_cfg.data
    cols = [task_cfg.feature_column, *data_cfg.passthrough_columns]
    if info.has_id:
        cols.append(data_cfg.id_column)
    if with_label and info.has_label:
        cols.append(data_cfg.label_column)
    return [c for c in dict.fromkeys(cols) if c not in (PATH_COL, ROW_HASH_COL)]


def value_counts(batch: pa.Table, column: str) -> pa.Table:
    counts = pc.value_counts(batch.column(column).combine_chunks())
    return pa.table({"value": counts.field("values"), "count": counts.field("counts").cast(pa.int64())})


def _merge_counts(*parts: pa.Table, limit: int | None = None, min_count: int = 1) -> pa.Table:
    """Sum partial (value, count) tables; most frequent first, ties by value, so the result is deterministic."""
    table = (
        pa.concat_tables(parts)
        if parts
        else pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    )
    merged = table.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])
    merged = merged.filter(
        pc.and_(pc.is_valid(merged["value"]), pc.greater_equal(merged["count"], min_count))
    )
    merged = merged.sort_by([("count", "descending"), ("value", "ascending")])
    return merged.slice(0, limit) if limit is not None else merged


def count_values(
    ds, counter, fn_kwargs: dict[str, Any], limit: int | None = None, min_count: int = 1
) -> pa.Table:
    """Distributed value counting: per-batch counts with ``map_batches``, summed by one Ray task.

    Only the partial counts move (object refs, never through the driver); ``groupby`` would start a
    shuffle's aggregator actors for a few counts (docs/PERFORMANCE.md).
    """
    import ray

    partial = ds.map_batches(counter, batch_format="pyarrow", batch_size=8192, fn_kwargs=fn_kwargs)
    refs = partial.materialize().to_arrow_refs()
    merge = ray.remote(_merge_counts)
    return ray.get(merge.remote(*refs, limit=limit, min_count=min_count))


def build_label_names(info: SplitInfo, task_cfg: TaskConfig) -> list[str]:
    """Class names in index order. Int labels: 0..K-1 (K from config or the data). Strings: sorted distinct values."""
    label_col = task_cfg.data.label_column
    num_classes = task_cfg.data.num_classes
    ds = read_split(info, columns=[label_col])
    values = count_values(ds, value_counts, {"column": label_col})["value"].to_pylist()
    if not values:
        raise DataError(f"{info.path}: column {label_col!r} has no non-null labels")
    if info.label_type == "string":
        if len(values) < 2:
            raise DataError(
                f"{info.path}: column {label_col!r} has {len(values)} distinct label(s), need at least 2"
            )
        return sorted(values)
    lo, hi = min(values), max(values)
    if num_classes is None:
        num_classes = int(hi) + 1
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{info.path}: column {label_col!r} has labels in {int(lo)}..{int(hi)}, "
            f"outside the configured {num_classes} classes (0..{num_classes - 1})"
        )
    if num_classes < 2:
        raise DataError(f"{info.path}: column {label_col!r} has a single class; need at least 2")
    return [str(i) for i in range(num_classes)]


def label_variants(names: list[str]) -> list[list[str]]:
    """String labels that differ only by case or surrounding whitespace (" World", "world"): kept as the
    separate classes they are in the data, but worth a warning, since they are usually one class."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.strip().casefold(), []).append(name)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def build_tokenizer(info: SplitInfo, text_cfg: TextConfig, seed: int = 0) -> str:
    """The text task's tokenizer (its JSON), trained on the training split's text as Ray Data streams it
    through the driver in batches (never the whole corpus at once). A split of more than
    ``tokenizer.TRAIN_ROWS`` rows is sampled down to about that many rows, drawn from ``seed``."""
    from dlbatch.tokenizer import TRAIN_ROWS, train_tokenizer

    column = text_cfg.column
    ds = read_split(info, columns=[column])
    if info.num_rows > TRAIN_ROWS:
        ds = ds.random_sample(TRAIN_ROWS / info.num_rows, seed=seed)

    def texts():
        for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
            yield pc.drop_null(batch.column(column)).to_pylist()

    return train_tokenizer(texts(), text_cfg.vocab_size, text_cfg.min_count)
