"""Accuracy parity: dlbatch (Ray Data + Ray Train, data-parallel) vs. a plain single-process PyTorch loop.

Same demo data, same preprocessing, model, epochs and *global* batch size (workers x per-worker batch).

    python bench/parity.py [key=value overrides...]      # prints one line per task, writes bench/parity.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plain import accuracy, load_split, spec_for, train_plain

from dlbatch.config import load_config
from dlbatch.pipeline import check_task_data, data_paths
from dlbatch.runner import run_nightly


def main(overrides: list[str]) -> dict:
    cfg = load_config(None, ["output_root=dlbatch-output/parity", *overrides])
    summaries = {s["task"]: s for s in run_nightly(cfg)}
    report = {}
    for task in cfg.tasks:
        tcfg = cfg.task(task).train
        data = check_task_data(cfg, task, ("train", "val", "test"))
        paths = data_paths(cfg, task)
        spec = spec_for(task, data.meta)
        train, val, test = (load_split(paths[s], spec) for s in ("train", "val", "test"))
        model, _ = train_plain(
            task, data.meta, train, val, tcfg.epochs, tcfg.batch_size * tcfg.num_workers, tcfg.lr, tcfg.seed
        )
        plain_acc = accuracy(model, task, test)
        ray_acc = summaries[task]["test_accuracy"]
        report[task] = {"dlbatch": ray_acc, "plain": plain_acc, "diff_points": 100 * (ray_acc - plain_acc)}
        print(
            f"{task}: dlbatch {ray_acc:.2%}  plain PyTorch {plain_acc:.2%}  diff {report[task]['diff_points']:+.2f} points"
        )
    (Path(__file__).parent / "parity.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
