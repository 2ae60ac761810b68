"""Where a fit's fixed cost goes: every process's CPU from ``fit()`` to the first training batch.

    python bench/startup.py [--task text] [--rows 6000] [--json out.json] [key=value ...]

Starts a private local cluster (timed: "Ray start"), then runs one 2-epoch fit of the demo data through
``run_train`` while a thread samples the CPU time of every process on the machine (psutil, every 0.2 s).
For the window from ``fit()`` to the first training batch it prints, per process that used CPU in it: when
it started (seconds after ``fit()``), its CPU seconds in the window and when it last used CPU; then how
many cores were busy in each second of the window. On 2 cores a window that keeps both busy is CPU-bound:
only less work, not earlier work, shortens it. Trailing ``key=value`` arguments override the job config
(e.g. ``text.train.num_workers=1``). Run it on an otherwise idle machine; the sampling itself costs ~0.1 core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dlbatch.cluster import ensure_ray  # noqa: E402
from dlbatch.config import load_config  # noqa: E402
from dlbatch.demo import write_demo_data  # noqa: E402
from dlbatch.flow import run_train  # noqa: E402


class ProcessSampler:
    """Every process's name and cumulative CPU seconds, every ``interval`` seconds, in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now, row = time.time(), {}
            for proc in psutil.process_iter(["cmdline", "cpu_times", "create_time"]):
                cpu = proc.info["cpu_times"]
                if cpu is None:  # gone, or not ours to read
                    continue
                name = " ".join(proc.info["cmdline"] or []) or proc.name()
                # "ray/core/src/ray/raylet/raylet ...", not the venv's path; Ray pads its titles with spaces.
                name = name.split("site-packages/")[-1].strip()
                row[proc.pid] = (name, cpu.user + cpu.system, proc.info["create_time"])
            self.samples.append((now, row))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def create_time_offset() -> float:
    """How far psutil's process start times are off the clock: Linux gives the boot time in whole seconds,
    so they share an error of up to 1 s. Measured on a child started now."""
    import subprocess

    before = time.time()
    child = subprocess.Popen(["sleep", "0.2"])
    offset = psutil.Process(child.pid).create_time() - before
    child.wait()
    return offset


def process_name(titles: Counter) -> str:
    """A process's name from the titles sampled: Ray retitles its workers as they run ("ray::IDLE", then
    "ray::RayTrainWorker", "ray::execute._join" during a call), and a sample may catch a title half
    rewritten. The most frequent "ray::<name>" without a method, else the most frequent title."""
    actors = Counter({t: n for t, n in titles.items() if t.startswith("ray::") and "." not in t})
    return (actors or titles).most_common(1)[0][0]


def window_report(samples: list, start: float, end: float, offset: float = 0.0) -> dict:
    """Per process: start offset, CPU seconds within [start, end], last busy moment; cores busy per second.
    ``offset`` is subtracted from the processes' start times (see ``create_time_offset``)."""
    names, created, series = {}, {}, {}
    for now, row in samples:
        for pid, (name, cpu, born) in row.items():
            names.setdefault(pid, Counter())[name] += 1
            created[pid] = born
            series.setdefault(pid, []).append((now, cpu))
    processes = []
    for pid, points in series.items():
        before = [cpu for t, cpu in points if t <= start]
        inside = [(t, cpu) for t, cpu in points if start < t <= end]
        if not inside:
            continue
        base = before[-1] if before else 0.0  # a process born in the window starts from 0
        used = inside[-1][1] - base
        if used < 0.05:
            continue
        steps = pairwise([(start, base)] + inside)
        busy_until = max((t1 for (_, c0), (t1, c1) in steps if c1 - c0 > 0.03), default=start)
        processes.append(
            {
                "process": process_name(names[pid])[:70],
                "started_s": round(created[pid] - offset - start, 1),
                "cpu_s": round(used, 2),
                "busy_until_s": round(busy_until - start, 1),
            }
        )
    processes.sort(key=lambda p: p["started_s"])
    cores = {}
    for (_, row0), (t1, row1) in pairwise(samples):
        if start <= t1 <= end:
            second = int(t1 - start)
            # A process first seen in this sample was born since the last one: all its CPU is new.
            delta = sum(max(0.0, cpu - row0.get(pid, (None, 0.0))[1]) for pid, (_, cpu, _) in row1.items())
            cores[second] = cores.get(second, 0.0) + delta
    return {"processes": processes, "cores_busy_per_second": [round(cores[k], 1) for k in sorted(cores)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="text", choices=["image", "text"])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("overrides", nargs="*", help="job config key=value overrides")
    args = parser.parse_args()

    import ray.train.torch

    root = Path(tempfile.mkdtemp(prefix="dlbatch-startup-"))
    paths = write_demo_data(root / "data", args.task, train_rows=args.rows, seed=0)
    cfg = load_config(None, [f"tasks=[{args.task}]", f"output_root={root / 'out'}", "run_date=2026-01-01",
                             f"{args.task}.train.epochs=2", *[f"{args.task}.data.{s}={p}" for s, p in paths.items()],
                             *args.overrides])  # fmt: skip
    started = time.perf_counter()
    ensure_ray(cfg)
    ray_start = time.perf_counter() - started

    # When fit() is called: the pipeline's own first-batch figure counts from there.
    fit_calls: list[float] = []
    trainer_fit = ray.train.torch.TorchTrainer.fit

    def timed_fit(self, *a, **k):
        fit_calls.append(time.time())
        return trainer_fit(self, *a, **k)

    ray.train.torch.TorchTrainer.fit = timed_fit
    with ProcessSampler() as sampler:
        [summary] = run_train(cfg)
    first_batch = summary["durations_s"]["train_first_batch"]
    report = {
        "task": args.task,
        "ray_start_s": round(ray_start, 2),
        "fit_to_first_batch_s": round(first_batch, 2),
        **window_report(sampler.samples, fit_calls[0], fit_calls[0] + first_batch, create_time_offset()),
    }
    print(
        f"Ray start {report['ray_start_s']:.1f} s; fit() to the first batch {first_batch:.1f} s ({args.task})"
    )
    print(f"{'started':>8} {'CPU s':>6} {'busy to':>8}  process (times in s after fit())")
    for p in report["processes"]:
        print(f"{p['started_s']:>+8.1f} {p['cpu_s']:>6.2f} {p['busy_until_s']:>8.1f}  {p['process']}")
    total = sum(p["cpu_s"] for p in report["processes"])
    print(f"{total:.1f} s of CPU in {first_batch:.1f} s; cores busy, second by second:")
    print(" ".join(f"{c:.1f}" for c in report["cores_busy_per_second"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
