"""What every stage of a night knows before it starts: the run context, built once per task and frozen."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Literal

from dlbatch.config import ImageTaskConfig, JobConfig, Task, TextTaskConfig
from dlbatch.store import RunPaths, run_paths

Mode = Literal["train", "nightly", "predict"]
# The splits each job reads: a job's mode says what it does, never the splits it happens to find.
MODE_SPLITS: dict[Mode, tuple[str, ...]] = {
    "train": ("train", "val", "test"),
    "nightly": ("train", "val", "test", "score"),
    "predict": ("score",),
}


@dataclass(frozen=True)
class RunContext:
    """One task's run on one date: the job config, that task's typed config, where it writes, the mode.
    Built once per task by the flow; every stage reads it, none changes it."""

    job: JobConfig
    task: Task
    mode: Mode

    @property
    def config(self) -> ImageTaskConfig | TextTaskConfig:
        return self.job.task(self.task)

    @functools.cached_property
    def paths(self) -> RunPaths:
        # Once per context: an object store's filesystem object is built from the URI only here.
        return run_paths(self.job.output_root, self.task, self.job.effective_run_date().isoformat())

    @functools.cached_property
    def seed(self) -> int:
        """Base seed of the run's shuffles; Ray Data combines it with each epoch's execution index."""
        return zlib.crc32(f"{self.config.train.seed}/{self.paths.run_id}".encode())

    @property
    def run_id(self) -> str:
        return self.paths.run_id

    @property
    def splits(self) -> tuple[str, ...]:
        return MODE_SPLITS[self.mode]
