"""The fixed cost of one Ray Train fit on this machine, apart from any model: fit() -> the loop entered
on every worker -> the first batch -> fit() returns, for 1 and 2 workers, with and without Ray Data's
per-epoch global shuffle. What every dlbatch fit (and every test that fits) pays before its first step.

    python bench/fit_overhead.py              # prints one line per setting
    python bench/fit_overhead.py --processes  # and, per fit, each Ray process it started: when it was
                                              # created, ready (ray::IDLE), the actor it became and
                                              # the CPU time it used
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
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


def _has_torch(pid: int) -> bool:
    """Whether the process has loaded torch's C++ library (read from its memory map)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch_cpu" in maps.read()
    except OSError:
        return False


class ProcessWatch:
    """Ray's worker processes as the OS lists them, sampled every 0.1 s: creation time, each title
    (``ray::IDLE``, then ``ray::<Actor>.<method>``) with when it was first seen, and CPU time used."""

    def __init__(self) -> None:
        self.seen: dict[int, dict] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psutil

        while True:
            for proc in psutil.process_iter(["cmdline", "create_time"]):
                words = " ".join(proc.info["cmdline"] or []).split()
                if words and words[0].startswith("ray::"):
                    entry = self.seen.setdefault(
                        proc.pid, {"created": proc.info["create_time"], "titles": []}
                    )
                    title = words[0].removeprefix("ray::").split(".")[0]
                    if not entry["titles"] or entry["titles"][-1][1] != title:
                        entry["titles"].append((time.time(), title))
                    if not entry.get("torch"):
                        entry["torch"] = _has_torch(proc.pid)
                    with contextlib.suppress(psutil.Error):
                        cpu = proc.cpu_times()
                        entry.setdefault("cpu", []).append((time.time(), cpu.user + cpu.system))
            time.sleep(0.1)

    def report(self, since: float) -> None:
        total = 0.0
        for _, entry in sorted(self.seen.items(), key=lambda item: item[1]["created"]):
            titles = [(at, title) for at, title in entry["titles"] if at >= since]
            samples = entry.get("cpu") or [(0.0, 0.0)]
            before = next((cpu for at, cpu in reversed(samples) if at < since), 0.0)
            used = samples[-1][1] - before
            total += used
            if titles:
                became = ", ".join(f"{title} {at - since:.1f}" for at, title in titles)
                torch = ", torch loaded" if entry.get("torch") else ""
                print(f"    process created {entry['created'] - since:5.1f} s: {became} ({used:.1f} CPU s{torch})",
                      flush=True)  # fmt: skip
        print(f"    Ray worker processes' CPU time in all: {total:.1f} s", flush=True)


def main() -> None:
    watch = ProcessWatch() if "--processes" in sys.argv[1:] else None
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
            if watch:
                watch.report(started)
    ray.shutdown()


if __name__ == "__main__":
    main()
