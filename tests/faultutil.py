"""Fault injection shared by the fault tests, tests/multinode_run.py and bench/faults.py: real processes
are found from the OS and killed with SIGKILL; Ray Train's checkpoint registration is read from its snapshot."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from dlbatch.demo import make_text_table


def _snapshot(storage: Path) -> dict:
    try:
        return json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def registered_metrics(storage: Path) -> list[dict]:
    """Metrics of each checkpoint Ray Train's controller has registered (its snapshot file). Files on disk
    are not enough: a checkpoint reported shortly before a failure may never be registered, and is then not
    resumed from."""
    return [entry.get("metrics") or {} for entry in _snapshot(storage).get("checkpoint_results") or []]


def registered_checkpoints(storage: Path) -> int:
    return len(registered_metrics(storage))


def latest_registered_metrics(storage: Path) -> dict | None:
    """Metrics of the checkpoint a restarted worker group would resume from (the latest registered)."""
    return (_snapshot(storage).get("latest_checkpoint_result") or {}).get("metrics")


def ray_process_pids(title: str, started_after: float | None) -> list[int]:
    """PIDs of live Ray worker processes whose title starts with ``ray::{title}`` (an actor class, or the
    task a worker is running), started after ``started_after`` (actors of earlier tests may still be exiting).

    Read from the OS, not Ray's state API: that API can time out on a loaded 2-core machine."""
    pids = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        alive = proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        created = proc.info["create_time"]
        fresh = started_after is None or created >= started_after
        if cmdline.startswith(f"ray::{title}") and fresh and alive:
            pids.append(proc.pid)
    return pids


def kill_process_when(
    title: str, ready, state: dict, timeout: float = 240, new_processes_only: bool = True
) -> threading.Thread:
    """SIGKILL one live Ray process titled ``ray::{title}...`` once ``ready()`` is true; records what it
    killed. ``new_processes_only=False`` for work Ray may run in an already started (idle) worker process."""

    started = time.time() if new_processes_only else None

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline and "killed_pid" not in state:
            pids = ray_process_pids(title, started) if ready() else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                state["killed_pid"], state["killed_at"] = pids[0], time.time()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL a job and its private Ray instance at once, as when its machine or pod dies. Ray starts each
    worker in its own process group, so killing the job's group alone leaves workers that can still finish
    a block and write it into the dead attempt's staging directory after the rerun has cleaned it."""
    tree = psutil.Process(job.pid).children(recursive=True)
    os.killpg(job.pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    job.wait()
    psutil.wait_procs(tree, timeout=30)


def write_score_split(score: Path, rows: int, files: int = 8) -> Path:
    """An unlabeled text split of ``rows`` rows in ``files`` Parquet files (all rows, any ``rows``)."""
    score.mkdir(parents=True)
    table = make_text_table(rows, seed=9, with_labels=False)
    bounds = [i * rows // files for i in range(files + 1)]
    for i in range(files):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), score / f"part-{i}.parquet")
    return score
