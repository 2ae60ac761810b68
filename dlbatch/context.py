"""What every stage of a night knows before it starts: the run context, built once per task and frozen."""

from __future__ import annotations

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
    """One task's run on one date: the job config, that task's typed config, where it writes, the mode."""

    job: JobConfig
    task: Task
    config: ImageTaskConfig | TextTaskConfig
    paths: RunPaths
    mode: Mode
    seed: int  # base seed of the run's shuffles; Ray Data combines it with each epoch's execution index

    @property
    def run_id(self) -> str:
        return self.paths.run_id

    @property
    def splits(self) -> tuple[str, ...]:
        return MODE_SPLITS[self.mode]


def build_context(cfg: JobConfig, task: Task, mode: Mode) -> RunContext:
    config = cfg.task(task)
    paths = run_paths(cfg.output_root, task, cfg.effective_run_date().isoformat())
    seed = zlib.crc32(f"{config.train.seed}/{paths.run_id}".encode())
    return RunContext(job=cfg, task=task, config=config, paths=paths, mode=mode, seed=seed)
