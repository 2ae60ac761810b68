"""Score parts: how the score split is cut, what a finished part is keyed by, which parts a rerun keeps."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dlbatch.store import (
    PART_DONE,
    file_fingerprints,
    finished_parts,
    mark_published,
    part_key,
    plan_parts,
    tree_fingerprint,
)


def test_parts_are_whole_consecutive_files_of_at_most_the_configured_rows():
    assert plan_parts([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert plan_parts([5, 5, 5, 5], 9) == [[0], [1], [2], [3]]
    assert plan_parts([3, 30, 3, 3], 10) == [[0], [1], [2, 3]]  # a larger file is a part of its own
    assert plan_parts([30], 10) == [[0]]
    assert plan_parts([4, 0, 6, 1], 10) == [[0, 1, 2], [3]]
    files = [7, 1, 9, 4, 4, 12, 2, 3, 8]
    parts = plan_parts(files, 10)
    assert [i for part in parts for i in part] == list(range(len(files)))  # every file once, in order
    assert all(sum(files[i] for i in part) <= 10 or len(part) == 1 for part in parts)


def _file(path, rows):
    pq.write_table(pa.table({"id": list(range(rows))}), path)
    return str(path)


def test_a_part_key_changes_with_its_input_files_and_the_fingerprint(tmp_path):
    fs = pafs.LocalFileSystem()
    a, b = _file(tmp_path / "a.parquet", 10), _file(tmp_path / "b.parquet", 10)
    config = {"model": "m1", "config": {"predict": {"batch_size": 512}}}
    key = part_key(file_fingerprints(fs, [a, b]), config)
    assert part_key(file_fingerprints(fs, [a, b]), config) == key  # nothing changed: the same key
    assert part_key(file_fingerprints(fs, [a]), config) != key
    assert part_key(file_fingerprints(fs, [a, b]), {**config, "model": "m2"}) != key
    _file(tmp_path / "b.parquet", 11)  # rewritten with other rows: other size and modification time
    assert part_key(file_fingerprints(fs, [a, b]), config) != key
    before = part_key(file_fingerprints(fs, [a]), config)
    stat = os.stat(a)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched
    assert part_key(file_fingerprints(fs, [a]), config) != before


def test_a_model_directory_is_fingerprinted_by_every_file_in_it(tmp_path):
    fs = pafs.LocalFileSystem()
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.pt").write_bytes(b"w" * 10)
    (model / "sub" / "meta.json").write_text("{}")
    found = tree_fingerprint(fs, str(model))
    assert [(os.path.relpath(path, model), size) for path, size, _ in found] == [
        ("model.pt", 10),
        ("sub/meta.json", 2),
    ]


def test_a_rerun_keeps_only_finished_parts_it_still_wants(tmp_path):
    fs = pafs.LocalFileSystem()
    parts = tmp_path / "score-parts"
    for name, done in [("k1-aaa", True), ("k2-bbb", False), ("k3-ccc", True), ("k1-ddd", True)]:
        (parts / name).mkdir(parents=True)
        (parts / name / "0.parquet").write_bytes(b"x")
        if done:
            mark_published(fs, str(parts / name), {"rows": 1}, marker=PART_DONE)
    (parts / "stray.parquet").write_bytes(b"x")

    kept = finished_parts(fs, str(parts), {"k1", "k2"})
    # k1 was finished twice (two killed attempts): one copy is kept. k2 never finished and k3 is not
    # wanted (its inputs, model or config changed): both are deleted, as is anything else in there.
    assert set(kept) == {"k1"} and kept["k1"] in {str(parts / "k1-aaa"), str(parts / "k1-ddd")}
    assert sorted(p.name for p in parts.iterdir()) == [os.path.basename(kept["k1"])]
    assert (parts / os.path.basename(kept["k1"]) / PART_DONE).exists()
    assert finished_parts(fs, str(tmp_path / "missing"), {"k1"}) == {}
