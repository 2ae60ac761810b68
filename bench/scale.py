"""Scale row: a training split whose preprocessed size is several times the object store.

    cd bench && python scale.py [--rows 40000] [--store-fraction 0.004]

A local cluster with its object store capped (RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION) trains the CNN
one epoch on demo digits decoded at 64x64 (16 KiB a row as float32), at a quarter of ``--rows`` and at
``--rows``: the job's peak resident memory (driver and every Ray worker) should stay about the same, since
``train.materialize=auto`` streams both. Prints a table and writes bench/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument(
        "--store-fraction", default="0.004", help="of the host's memory, for the object store"
    )
    args = parser.parse_args()
    # Read when Ray starts its local cluster, so before ensure_ray.
    os.environ["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = args.store_fraction

    import ray
    from run import PeakRSS

    from dlbatch.cluster import ensure_ray
    from dlbatch.config import load_config
    from dlbatch.flow import run_train
    from dlbatch.ingest import preprocessed_bytes

    root = tempfile.mkdtemp(prefix="dlbatch-scale-")
    ensure_ray(load_config(None, []))
    store = ray.cluster_resources()["object_store_memory"]
    results = {"object_store_bytes": store, "runs": []}
    for rows in (args.rows // 4, args.rows):
        cfg = load_config(None, [
            "tasks=[image]", f"output_root={root}/out-{rows}", f"demo_rows={rows}", "run_date=2026-01-01",
            "image.image.height=96", "image.image.width=96", "image.train.epochs=1",
        ])  # fmt: skip
        with PeakRSS() as mem:
            [summary] = run_train(cfg)
        [epoch] = summary["history"]
        nbytes = preprocessed_bytes(cfg.image, summary["rows"]["train"]["read"])
        results["runs"].append({
            "train_rows": summary["rows"]["train"]["read"],
            "preprocessed_bytes_estimate": nbytes,
            "times_object_store": nbytes / store,
            "materialized": summary["metrics"]["training_data"]["materialized"],
            "fit_to_first_step_s": summary["durations_s"]["train_first_batch"],
            "samples_per_s": epoch["samples_per_s"],
            "train_stage_s": summary["durations_s"]["train"],
            "peak_rss_bytes": mem.peak,
            "test_accuracy": summary["test_accuracy"],
        })  # fmt: skip
    small, large = results["runs"]
    results["peak_rss_ratio"] = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    (HERE / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"object store {store / 2**20:,.0f} MiB")
    print(
        f"{'train rows':>10} {'x store':>8} {'streamed':>9} {'1st step s':>10} {'samples/s':>10} {'peak RSS MiB':>13}"
    )
    for r in results["runs"]:
        print(f"{r['train_rows']:>10,} {r['times_object_store']:>8.1f} {str(not r['materialized']):>9} "
              f"{r['fit_to_first_step_s']:>10.1f} {r['samples_per_s']:>10,.0f} {r['peak_rss_bytes'] / 2**20:>13,.0f}")  # fmt: skip
    print(f"peak RSS {args.rows:,} rows / {args.rows // 4:,} rows: {results['peak_rss_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
