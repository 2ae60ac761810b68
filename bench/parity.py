"""Accuracy parity: dlbatch (Ray Data + Ray Train, data-parallel) vs. a plain single-process PyTorch loop.

Same demo data, same preprocessing, model, epochs and *global* batch size (workers x per-worker batch).
One run of a seed is deterministic on both sides, but test accuracy after a few epochs on the demo data
moves by about 2 points (either side) with the order the rows are trained in and the initial weights,
so both sides train with several seeds and the medians are compared (~8 minutes for 5 seeds on 2 cores).
Seed s: dlbatch with ``train.seed=s`` (its file order and initial weights); the plain loop with its
initial weights from s and the training rows in an order drawn from s (seed 0: the stored order).

    python bench/parity.py [--seeds 5] [key=value overrides...]   # a line per task; writes bench/parity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from plain import accuracy, load_split, spec_for, train_plain

from dlbatch.config import load_config
from dlbatch.context import RunContext
from dlbatch.flow import run_nightly
from dlbatch.ingest import check_data, checkpoint_meta, data_paths, learn


def plain_accuracy(cfg, task: str, seed: int) -> float:
    tcfg = cfg.task(task).train
    ctx = RunContext(cfg, task, "train")
    meta = checkpoint_meta(ctx, learn(ctx, check_data(ctx)))
    paths = data_paths(ctx)
    spec = spec_for(task, meta)
    train, val, test = (load_split(paths[s], spec) for s in ("train", "val", "test"))
    if seed:
        order = torch.randperm(len(train["y"]), generator=torch.Generator().manual_seed(seed))
        train = {name: values[order] for name, values in train.items()}
    model, _ = train_plain(
        task, meta, train, val, tcfg.epochs, tcfg.batch_size * tcfg.num_workers, tcfg.lr, seed
    )
    return accuracy(model, task, test)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per side (0, 1, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both sides")
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, list[float]]] = {}
    tasks = load_config(None, args.overrides).tasks
    for seed in range(args.seeds):
        seeded = [f"{task}.train.seed={seed}" for task in tasks]
        cfg = load_config(
            None, [f"output_root=dlbatch-output/parity/seed-{seed}", "force=true", *args.overrides, *seeded]
        )
        for summary in run_nightly(cfg):
            task = summary["task"]
            runs.setdefault(task, {"dlbatch": [], "plain": []})
            runs[task]["dlbatch"].append(summary["test_accuracy"])
            runs[task]["plain"].append(plain_accuracy(cfg, task, seed))
            print(
                f"{task} seed {seed}: dlbatch {runs[task]['dlbatch'][-1]:.2%}  plain {runs[task]['plain'][-1]:.2%}",
                flush=True,
            )
    report = {}
    for task, accs in runs.items():
        ours, theirs = statistics.median(accs["dlbatch"]), statistics.median(accs["plain"])
        report[task] = {"dlbatch": ours, "plain": theirs, "diff_points": 100 * (ours - theirs), "runs": accs}
        print(
            f"{task}: median of {args.seeds} seeds: dlbatch {ours:.2%}  plain PyTorch {theirs:.2%}  "
            f"diff {report[task]['diff_points']:+.2f} points  (dlbatch {' / '.join(f'{a:.1%}' for a in accs['dlbatch'])}; "
            f"plain {' / '.join(f'{a:.1%}' for a in accs['plain'])})"
        )
    (Path(__file__).parent / "parity.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
