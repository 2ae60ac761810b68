"""Connecting to Ray: join the cluster a job was submitted to, or start a local one sized for the job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from dlbatch.config import JobConfig

log = logging.getLogger(__name__)


def local_num_cpus(cfg: JobConfig) -> int:
    """Logical CPUs for a local cluster: the largest worker group plus room for Ray Data and inference.

    Training workers each hold their CPUs for the whole fit; if they held every CPU, Ray Data could not run
    and the job would hang. Declaring more logical CPUs than physical cores is safe here: each worker runs
    one intra-op thread (Ray sets OMP_NUM_THREADS from the worker's CPUs).
    """
    if cfg.cluster.local_num_cpus:
        return cfg.cluster.local_num_cpus
    need = max(
        int(t.train.num_workers * t.train.cpus_per_worker) + 2 for t in (cfg.task(name) for name in cfg.tasks)
    )
    return max(need, os.cpu_count() or 1)


def use_assigned_cpus() -> int:
    """Size torch's intra-op thread pool to the CPUs Ray assigned to this worker/actor; returns it.

    Ray exports OMP_NUM_THREADS for the assignment, but torch sizes its pool when it is first imported.
    Where workers import torch before that (measured with a cluster started with
    RAY_preload_python_modules=torch) every 1-CPU worker kept the machine's core count: 2 threads on this
    2-core machine, GRU training 4x slower. Call it first in a worker or actor."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def configure_data_context() -> None:
    """Ray Data settings for this driver (applied per run, never at import)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Ray 2.60's default V2 Parquet datasource spent ~4.5 s per read_parquet on a 2-core machine listing and
    # sampling files (the legacy reader: ~0.2 s), and this job reads a dataset per split.
    ctx.use_datasource_v2 = False
    # One "Total Progress" line per update instead of a block per operator: progress without a wall.
    ctx.enable_operator_progress_bars = False


def dashboard_unavailable() -> str | None:
    """Why Ray's dashboard cannot start in this environment (a plain ``ray`` install without the
    ``[default]`` extra), or None. The check is the import Ray itself makes before starting it."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except Exception as err:  # ImportError, or a dependency that breaks while importing
        return f"{type(err).__name__}: {err}"
    return None


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environment(**values: str):
    """``os.environ`` updated for the block, then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_ray(cfg: JobConfig) -> None:
    """``ray.init`` once: the configured/submitted cluster if any, else a private local one on loopback."""
    import ray

    configure_data_context()
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A private local cluster has no spot nodes to drain: skip Ray Train's preemption watcher, one more
    # process per fit (~3 s of CPU to start on 2 cores). A submitted job keeps it; so does an explicit
    # setting. Ray Train hands this variable on from the driver to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    missing = dashboard_unavailable()
    if missing:
        # Asked for explicitly, ray.init would refuse to start at all ("Cannot include dashboard with
        # missing packages"); a laptop run should still run.
        log.warning(
            "Ray's dashboard cannot start here (%s); install 'ray[default]' for it. Running without it: "
            "Ray Train cannot remove a dead controller's placement group, and may warn about its state API.",
            missing,
        )
    # The cluster's own processes must find it by its address. Without RAY_ADDRESS, Ray's state API looks
    # for any cluster on the host; with another one running here (a `ray start`, a second job), Ray Train's
    # placement-group cleaner asked that one whether this job's controller was alive, was told no, and
    # quit (seen here). Every process ray.init starts inherits this environment; the driver's is restored.
    port = _free_loopback_port()
    with _environment(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}"):
        ray.init(
            address="local",  # always a private instance: never attach to a cluster that merely runs here
            num_cpus=local_num_cpus(cfg),
            # Wanted: the dashboard serves the state API through which Ray Train's PlacementGroupCleaner
            # watches the controller (without it: a warning every second, and no cleanup if the controller
            # dies). It costs ~1.3 s of start on 2 cores. Loopback only.
            include_dashboard=missing is None,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level=logging.WARNING,
        )
