"""The fixed cost of one Ray Train fit on this machine, apart from any model: fit() -> the loop entered
on every worker -> the first batch -> fit() returns, for 1 and 2 workers, with and without Ray Data's
per-epoch global shuffle. What every dlbatch fit (and every test that fits) pays before its first step.

    python bench/fit_overhead.py            # prints one line per setting
"""

from __future__ import annotations

import functools
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
from ray.data import RandomSeedConfig
from ray.train.torch import TorchTrainer

from dlbatch.cluster import own_address


def _loop(fit_at: float) -> dict[str, float]:
    entered = time.time()
    first = None
    shard = ray.train.get_dataset_shard("train")
    for _ in range(2):
        for _batch in shard.iter_torch_batches(batch_size=64):
            first = first or time.time()
    return {"entered": entered - fit_at, "first": first - fit_at}


def main() -> None:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as dlbatch's local cluster
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    with own_address():
        ray.init(address="local", num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level="WARNING")  # fmt: skip
    rows = ray.data.from_numpy(np.zeros((1500, 8), dtype=np.float32)).materialize()
    for workers in (1, 2):
        for shuffle in ("none", "global"):
            ds = rows if shuffle == "none" else rows.random_shuffle(
                seed=RandomSeedConfig(seed=1, reseed_after_execution=True)
            )  # fmt: skip
            started = time.time()
            result = TorchTrainer(
                functools.partial(_loop, started), datasets={"train": ds},
                scaling_config=ray.train.ScalingConfig(num_workers=workers),
                run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="dlbatch-fit-overhead-")),
            ).fit()  # fmt: skip
            got = result.return_value
            print(f"workers={workers} shuffle={shuffle}: loop entered {got['entered']:.1f} s, first batch "
                  f"{got['first']:.1f} s, fit() returned {time.time() - started:.1f} s", flush=True)  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
