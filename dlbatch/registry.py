"""Model store: versioned models per task, an atomically updated champion pointer, a promotion gate.

Layout under ``<output_root>/models/<task>/``:
    versions/<version>/     a copy of the run's best checkpoint (+ _SUCCESS)
    champion.json           {"version", "test_accuracy", "promoted_at_run", "history": [...]}

A new model becomes champion only if it passes the quality floor and its test accuracy is at least the
champion's (re-measured on the same test data) minus ``promotion_tolerance`` (the decision itself:
``dlbatch/gate.py``). Scoring always uses the
champion. A forced rerun of a night replaces that night's version and is decided again, against the
champion as it stood before that night.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow.fs as pafs

from dlbatch.store import (
    RunPaths,
    is_published,
    mark_published,
    move_into_place,
    read_json,
    remove_if_exists,
    write_json,
)


class ModelStore:
    def __init__(self, paths: RunPaths):
        self.fs = paths.fs
        self.root = "/".join([paths.root, "models", paths.task])
        self.uri_root = "/".join([paths.uri_root.rstrip("/"), "models", paths.task])

    def version_path(self, version: str) -> str:
        return f"{self.root}/versions/{version}"

    def version_uri(self, version: str) -> str:
        return f"{self.uri_root}/versions/{version}"

    def champion(self) -> dict[str, Any] | None:
        return read_json(self.fs, f"{self.root}/champion.json")

    def add_version(self, version: str, model_dir: str, replace: bool = False) -> bool:
        """Copy a published model directory into the store as ``version``. An existing version is kept
        (a retried night stores its model once) unless ``replace`` (a forced night). Returns whether the
        store now holds this model directory's copy for the first time."""
        dest = self.version_path(version)
        if is_published(self.fs, dest) and not replace:
            return False
        staged = f"{self.root}/_staging-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(staged, recursive=True)
        pafs.copy_files(model_dir, staged, source_filesystem=self.fs, destination_filesystem=self.fs)
        remove_if_exists(self.fs, f"{staged}/_SUCCESS")
        move_into_place(self.fs, staged, dest)
        mark_published(self.fs, dest, {"version": version})
        return True

    def champion_before(self, version: str) -> dict[str, Any] | None:
        """The champion that ``version``'s night competes with: the current one, or, when ``version`` is
        itself the champion (a forced rerun of its night), the one it replaced, if that is still stored."""
        current = self.champion()
        if current is None or current["version"] != version:
            return current
        earlier = [h for h in current.get("history", []) if h["version"] != version]
        for entry in reversed(earlier):
            if is_published(self.fs, self.version_path(entry["version"])):
                return {"version": entry["version"], "test_accuracy": entry["test_accuracy"]}
        return None

    def set_champion(self, version: str, accuracy: float, run_id: str) -> None:
        """Replace champion.json in one rename (local) / one object write (S3): readers see old or new."""
        previous = self.champion() or {}
        history = [
            *previous.get("history", []),
            {"version": version, "test_accuracy": accuracy, "run": run_id},
        ]
        write_json(self.fs, f"{self.root}/champion.json", {
            "version": version, "test_accuracy": accuracy, "promoted_at_run": run_id, "history": history[-50:],
        })  # fmt: skip

    def clear_champion(self) -> None:
        """No champion (a forced rerun of the first night produced a model below the quality floor)."""
        remove_if_exists(self.fs, f"{self.root}/champion.json")

    def apply_retention(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; never the champion. Returns what was deleted."""
        champion = (self.champion() or {}).get("version")
        entries = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/versions", allow_not_found=True))
        versions = sorted(i.base_name for i in entries if i.type == pafs.FileType.Directory)
        doomed = [v for v in versions[:-keep] if v != champion] if keep > 0 else []
        for version in doomed:
            self.fs.delete_dir(self.version_path(version))
        return doomed
