"""Run layout on local disk or object storage, and all-or-nothing publishing of outputs.

Readers honour ``_SUCCESS``: a directory without it is incomplete (a killed run) and is replaced by the
next run. On a local filesystem the finished directory is also moved into place with one rename.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from dlbatch.data import resolve_path

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class RunPaths:
    """Where one task's run for one date writes (``root`` is inside ``fs``; ``uri`` is what users see)."""

    fs: pafs.FileSystem
    root: str  # output_root inside fs
    uri_root: str  # output_root as configured (for messages and Ray, which takes URIs)
    task: str
    run_date: str

    @property
    def run_id(self) -> str:
        return f"{self.task}-{self.run_date}"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, "runs", self.run_date, self.task, *parts])

    def uri(self, *parts: str) -> str:
        return "/".join([self.uri_root.rstrip("/"), "runs", self.run_date, self.task, *parts])

    def on(self, run_date: str) -> RunPaths:
        """The same task's paths on another run date (same filesystem object)."""
        return replace(self, run_date=run_date)

    @property
    def storage_path(self) -> str:
        return "/".join([self.uri_root.rstrip("/"), "ray_results"])


def run_paths(output_root: str, task: str, run_date: str) -> RunPaths:
    fs, root = resolve_path(output_root)
    uri_root = output_root if "://" in output_root else root
    return RunPaths(fs=fs, root=root.rstrip("/"), uri_root=uri_root, task=task, run_date=run_date)


def is_published(fs: pafs.FileSystem, path: str, marker: str = SUCCESS) -> bool:
    return fs.get_file_info(f"{path}/{marker}").type == pafs.FileType.File


def mark_published(
    fs: pafs.FileSystem, path: str, info: dict[str, Any] | None = None, marker: str = SUCCESS
) -> None:
    with fs.open_output_stream(f"{path}/{marker}") as out:
        out.write(json.dumps(info or {}, default=str).encode())


def remove_if_exists(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path) if fs.get_file_info(path).type == pafs.FileType.Directory else fs.delete_file(
            path
        )


def staging_dir(paths: RunPaths, name: str) -> str:
    return paths.path("_staging", f"{name}-{uuid.uuid4().hex[:12]}")


def move_into_place(fs: pafs.FileSystem, src: str, dst: str) -> None:
    remove_if_exists(fs, dst)
    fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)  # one rename: readers see the old state or the whole new one
    else:
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)


PART_DONE = "_PART_DONE"


def plan_parts(file_rows: list[int], rows_per_part: int) -> list[list[int]]:
    """Consecutive files grouped into parts of at most ``rows_per_part`` rows (a larger file is a part of
    its own); each part is the list of its files' indices."""
    parts: list[list[int]] = []
    rows = 0
    for i, n in enumerate(file_rows):
        if not parts or (rows + n > rows_per_part and parts[-1]):
            parts.append([])
            rows = 0
        parts[-1].append(i)
        rows += n
    return parts


def file_fingerprints(fs: pafs.FileSystem, files: list[str]) -> list[tuple[str, int | None, int | None]]:
    """(path as given, size, modification time in ns) of each file."""
    return [(path, i.size, i.mtime_ns) for path, i in zip(files, fs.get_file_info(files), strict=True)]


def tree_fingerprint(fs: pafs.FileSystem, path: str) -> list[tuple[str, int | None, int | None]]:
    """(path, size, modification time in ns) of every file under a directory (or of the file itself)."""
    entries = fs.get_file_info([path])
    if entries[0].type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i.path, i.size, i.mtime_ns) for i in entries if i.type != pafs.FileType.Directory)


def part_key(inputs: list[tuple[str, int | None, int | None]], fingerprint: dict[str, Any]) -> str:
    """What a staged part's output depends on: its input files as they are now, the model and the config."""
    blob = json.dumps({"inputs": inputs, "fingerprint": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished_parts(fs: pafs.FileSystem, parts_dir: str, wanted: set[str]) -> dict[str, str]:
    """The staged parts a killed attempt finished (its done marker written) whose key is still wanted, as
    key -> directory. Everything else under ``parts_dir`` is deleted: unfinished parts, and parts of other
    inputs, another model or another config."""
    found: dict[str, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(parts_dir, allow_not_found=True)):
        key = info.base_name.rsplit("-", 1)[0]
        done = is_published(fs, info.path, PART_DONE)
        if info.type == pafs.FileType.Directory and done and key in wanted and key not in found:
            found[key] = info.path
        else:
            remove_if_exists(fs, info.path)
    return found


def staged_dataset(fs: pafs.FileSystem, staged: list[str]) -> pads.Dataset | None:
    """The Parquet files of the staged directories as one dataset (None: there are none)."""
    files = sorted(
        info.path
        for d in staged
        for info in fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    )
    return pads.dataset(files, filesystem=fs, format="parquet") if files else None


def publish_split(
    fs: pafs.FileSystem,
    staged: list[str],
    dest: str,
    rejects_dest: str,
    keep_columns: list[str],
    reject_columns: list[str],
    tmp: str,
) -> tuple[int, int]:
    """Split the Parquet files of the staged directories into ``dest`` (rows without a reject reason,
    ``keep_columns``) and ``rejects_dest`` (rows with one), stream-copying only these small output
    columns, assembled in ``tmp`` (a staging path); then mark ``dest`` published and delete the staged
    directories. Returns (kept rows, rejected rows)."""
    remove_if_exists(fs, tmp)
    dataset = staged_dataset(fs, staged)
    ok = pc.field("reject_reason").is_null()
    outputs = [(f"{tmp}/data", ok, keep_columns), (f"{tmp}/rejects", ~ok, reject_columns)]
    counts = []
    for out_dir, row_filter, columns in outputs:
        fs.create_dir(out_dir)
        scanner = dataset.scanner(columns=columns, filter=row_filter) if dataset else None
        if scanner is not None:
            pads.write_dataset(
                scanner,
                out_dir,
                format="parquet",
                filesystem=fs,
                basename_template="part-{i}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                max_rows_per_file=1_000_000,
                max_rows_per_group=100_000,
            )
        counts.append(dataset.count_rows(filter=row_filter) if dataset else 0)
    move_into_place(fs, f"{tmp}/rejects", rejects_dest)
    move_into_place(fs, f"{tmp}/data", dest)
    mark_published(fs, dest, {"rows": counts[0], "rejected": counts[1]})
    remove_if_exists(fs, tmp)
    for d in staged:
        remove_if_exists(fs, d)
    return counts[0], counts[1]


def write_json(fs: pafs.FileSystem, path: str, payload: dict[str, Any]) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(payload, indent=2, default=str).encode())
    fs.move(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as src:
            return json.loads(src.read())
    except FileNotFoundError:
        return None
