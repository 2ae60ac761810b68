"""Model store: versioned models per task, an atomically updated champion pointer, a promotion gate.

Layout under ``<output_root>/models/<task>/``:
    versions/<version>/     a copy of the run's best checkpoint (+ _SUCCESS)
    champion.json           {"version", "test_accuracy", "promoted_at_run", "history": [...]}

A new model becomes champion only if its test accuracy is at least the champion's (re-measured on the
same test data) minus ``promotion_tolerance``. Scoring always uses the champion.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs

from dlbatch.store import RunPaths, is_published, mark_published, move_into_place, read_json, remove_if_exists


@dataclass(frozen=True)
class Decision:
    promoted: bool
    champion_version: str
    reason: str
    candidate_accuracy: float
    previous_version: str | None = None
    previous_accuracy_same_test: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def add_version(self, version: str, model_dir: str) -> str:
        """Copy a published model directory into the store (idempotent: an existing version is kept)."""
        dest = self.version_path(version)
        if not is_published(self.fs, dest):
            staged = f"{self.root}/_staging-{uuid.uuid4().hex[:8]}"
            self.fs.create_dir(staged, recursive=True)
            pafs.copy_files(model_dir, staged, source_filesystem=self.fs, destination_filesystem=self.fs)
            remove_if_exists(self.fs, f"{staged}/_SUCCESS")
            move_into_place(self.fs, staged, dest)
            mark_published(self.fs, dest, {"version": version})
        return self.version_uri(version)

    def set_champion(self, version: str, accuracy: float, run_id: str) -> None:
        """Replace champion.json in one rename (local) / one object write (S3): readers see old or new."""
        previous = self.champion() or {}
        history = [
            *previous.get("history", []),
            {"version": version, "test_accuracy": accuracy, "run": run_id},
        ]
        from dlbatch.store import write_json

        write_json(self.fs, f"{self.root}/champion.json", {
            "version": version, "test_accuracy": accuracy, "promoted_at_run": run_id, "history": history[-50:],
        })  # fmt: skip

    def decide(
        self, version: str, candidate_acc: float, champion_acc_same_test: float | None, tolerance: float
    ) -> Decision:
        current = self.champion()
        if current is None:
            return Decision(True, version, "no champion yet", candidate_acc)
        if current["version"] == version:
            return Decision(True, version, "already champion", candidate_acc, version, champion_acc_same_test)
        floor = champion_acc_same_test - tolerance
        if candidate_acc >= floor:
            reason = (
                f"test accuracy {candidate_acc:.2%} >= champion {current['version']}'s {champion_acc_same_test:.2%} "
                f"- tolerance {tolerance:.2%}"
            )
            return Decision(True, version, reason, candidate_acc, current["version"], champion_acc_same_test)
        reason = (
            f"kept champion {current['version']}: test accuracy {candidate_acc:.2%} < its {champion_acc_same_test:.2%} "
            f"- tolerance {tolerance:.2%} on the same test data"
        )
        return Decision(
            False, current["version"], reason, candidate_acc, current["version"], champion_acc_same_test
        )

    def apply_retention(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; never the champion. Returns what was deleted."""
        champion = (self.champion() or {}).get("version")
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/versions", allow_not_found=True))
        versions = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        doomed = [v for v in versions[:-keep] if v != champion] if keep > 0 else []
        for version in doomed:
            self.fs.delete_dir(self.version_path(version))
        return doomed
