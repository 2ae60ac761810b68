"""dlbatch's defaults against a plain PyTorch loop on real public data (`../shared/data`: flowers5, sms_spam).

A new user's run: only the image size and colour set (`image.image.height/width/channels`), everything
else at its default. dlbatch needs a validation split to pick its best epoch, so it trains on 90% of
train.parquet (a seeded draw) and validates on the rest; the plain loop trains on all of it. Both score
the same test.parquet. The plain side is the reference loop given by --plain (one process, Adam at 1e-3,
batch 64, a new permutation every epoch).

    python bench/real_data.py [--data ../shared/data] [--epochs 5] [--sets flowers5 sms_spam]
        [--seeds 1] [key=value overrides for dlbatch...]

Prints a JSON line per set and side, and writes bench/real_data.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dlbatch.config import load_config
from dlbatch.flow import run_train

HERE = Path(__file__).resolve().parent


def split_train(src: Path, out: Path, val_share: float = 0.1) -> dict[str, str]:
    """train.parquet as train/val (a seeded draw of rows) and test.parquet as is."""
    table = pq.read_table(src / "train.parquet")
    order = np.random.default_rng(0).permutation(table.num_rows)
    n_val = max(1, round(val_share * table.num_rows))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(np.sort(order[n_val:])), out / "train.parquet")
    pq.write_table(table.take(np.sort(order[:n_val])), out / "val.parquet")
    return {"train": str(out / "train.parquet"), "val": str(out / "val.parquet"),
            "test": str(src / "test.parquet")}  # fmt: skip


def dlbatch_side(name: str, paths: dict[str, str], epochs: int, size: int, seed: int, root: Path,
                 overrides: list[str]) -> dict:  # fmt: skip
    task = "image" if "image" in pq.read_schema(paths["train"]).names else "text"
    settings = [f"{task}.data.{split}={path}" for split, path in paths.items()]
    if task == "image":
        settings += [f"image.image.height={size}", f"image.image.width={size}", "image.image.channels=3"]
    cfg = load_config(None, [
        f"tasks=[{task}]", f"output_root={root}/{name}-{seed}", f"{task}.train.epochs={epochs}",
        f"{task}.train.seed={seed}", *settings, *overrides,
    ])  # fmt: skip
    (summary,) = run_train(cfg)
    metrics = summary["metrics"]
    return {"set": name, "side": "dlbatch", "seed": seed, "accuracy": round(summary["test_accuracy"], 4),
            "macro_f1": round(metrics["test_macro_f1"], 4)}  # fmt: skip


def plain_side(plain: Path, data: Path, name: str, epochs: int, size: int) -> dict:
    out = subprocess.run([sys.executable, str(plain), str(data), name, str(epochs), str(size)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {"set": name, "side": "plain", "accuracy": found["accuracy"], "macro_f1": found["macro_f1"]}


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument(
        "--plain", type=Path, default=HERE.parent.parent / "shared" / "eval" / "plain_real.py"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sets", nargs="+", default=["flowers5", "sms_spam"])
    parser.add_argument("--seeds", type=int, default=1, help="dlbatch seeds per set (the median is reported)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-plain", action="store_true", help="dlbatch only (when choosing its defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            size = args.image_size if (args.data / name / "train.parquet").exists() else 64
            if not args.no_plain:
                rows.append(plain_side(args.plain, args.data, name, args.epochs, size))
                print(json.dumps(rows[-1]), flush=True)
            paths = split_train(args.data / name, Path(tmp) / "data" / name)
            runs = [dlbatch_side(name, paths, args.epochs, size, seed, Path(tmp), args.overrides)
                    for seed in range(args.seeds)]  # fmt: skip
            for run in runs:
                print(json.dumps(run), flush=True)
            rows.append({"set": name, "side": "dlbatch", "seeds": args.seeds, "overrides": args.overrides,
                         "accuracy": statistics.median(r["accuracy"] for r in runs),
                         "macro_f1": statistics.median(r["macro_f1"] for r in runs)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (HERE / "real_data.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
