"""What the input profile (dlbatch/profile.py) adds to a demo night's wall time.

    cd bench && python profile_overhead.py [--rows 6000] [--pairs 3] [--out profile_overhead.json]

Runs the whole demo night (both tasks: train, evaluate, score) in one local Ray cluster, ``--pairs`` times
with the profile on and as often with ``image.profile=false text.profile=false``, alternating the order
within each pair (on/off, off/on, ...) so that a drifting machine favours neither, after one warm-up
night that is not counted (the first night in a fresh cluster pays for starting its worker processes).
Every run has a run date and output directory of its own, so nothing is reused between runs; the demo data
is generated once. Reports the median wall time of each and their ratio (profile on / off): for the night,
per task, and for the stages where the profile is computed (preprocess, evaluate, predict), whose share
of a night is small enough that the night's own noise can hide it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dlbatch.cluster import ensure_ray  # noqa: E402
from dlbatch.config import load_config  # noqa: E402
from dlbatch.demo import write_demo_data  # noqa: E402
from dlbatch.flow import run_nightly  # noqa: E402

OFF = ("image.profile=false", "text.profile=false")


def night(root: Path, data: dict, date: str, profile: bool, extra: list[str]) -> dict[str, float]:
    overrides = [f"output_root={root / date}", f"run_date={date}", "progress_every_s=0", *extra]
    for task, splits in data.items():
        overrides += [f"{task}.data.{split}={path}" for split, path in splits.items()]
    cfg = load_config(None, [*overrides, *(() if profile else OFF)])
    started = time.perf_counter()
    summaries = run_nightly(cfg)
    seconds = {"night": time.perf_counter() - started}
    seconds.update({s["task"]: s["durations_s"]["total"] for s in summaries})
    seconds["profiled stages"] = sum(
        s["durations_s"].get(stage, 0.0) for s in summaries for stage in ("preprocess", "evaluate", "predict")
    )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=6000, help="demo training rows per task")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "profile_overhead.json"))
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = {task: write_demo_data(root / "data", task, args.rows, seed=0) for task in ("image", "text")}
        ensure_ray(load_config(None, extra))
        night(root, data, "2025-12-31", True, extra)  # warm-up, not counted
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for pair in range(args.pairs):
            for profile in (True, False) if pair % 2 == 0 else (False, True):
                date = f"2026-01-{len(runs[True]) + len(runs[False]) + 1:02d}"
                runs[profile].append(night(root, data, date, profile, extra))
                print(
                    f"pair {pair + 1}: profile {'on ' if profile else 'off'} {runs[profile][-1]['night']:.1f}s"
                )
    result = {"rows": args.rows, "pairs": args.pairs, "extra": extra}
    for what in ("night", "image", "text", "profiled stages"):
        on = statistics.median(r[what] for r in runs[True])
        off = statistics.median(r[what] for r in runs[False])
        result[what] = {
            "profile_on_s": round(on, 2),
            "profile_off_s": round(off, 2),
            "ratio": round(on / off, 3),
        }
        print(f"{what:>15}: profile on {on:6.1f}s, off {off:6.1f}s, ratio {on / off:.3f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
