"""Connecting to Ray: join the cluster a job was submitted to, or start a local one sized for the job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass

from dlbatch.config import JobConfig
from dlbatch.errors import ConfigError

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
        int(t.train.max_workers * t.train.cpus_per_worker) + 2 for t in (cfg.task(name) for name in cfg.tasks)
    )
    return max(need, os.cpu_count() or 1)


def use_assigned_cpus() -> int:
    """Size torch's intra-op thread pool to the CPUs Ray assigned to this worker/actor; returns it.

    Ray exports OMP_NUM_THREADS for the assignment, but torch sizes its pool when it is first imported:
    a worker that imported torch earlier keeps the machine's core count and oversubscribes it
    (docs/PERFORMANCE.md). Call it first in a worker or actor."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


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


@contextlib.contextmanager
def own_address(**extra: str):
    """The environment in which to start a private local cluster (``ray.init(address="local")``): a free
    loopback port for its GCS and RAY_ADDRESS naming it, inherited by every process the cluster starts.
    Without RAY_ADDRESS, Ray's state API looks for any cluster on the host; with a second one running there
    (a `ray start`, another job), Ray Train's placement-group cleaner cannot tell whether a controller
    lives and never removes a dead one's placement group. The caller's environment is restored after."""
    port = _free_loopback_port()
    with _environment(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}", **extra):
        yield


def cluster_address(cfg: JobConfig) -> str | None:
    """The cluster this job joins: configured, or the one it was submitted to (Ray sets RAY_ADDRESS for a
    submitted job). None: the job starts a private cluster that lives and dies with its driver."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


# Set by ``ensure_ray`` when it starts a private local cluster: its CPUs are all there will be.
_STARTED_LOCAL_CLUSTER = False


def check_cpus_left_for_data(task: str, num_workers: int, cpus_per_worker: float) -> None:
    """Ray Data reads, preprocesses and shuffles while the training workers hold their CPUs; with none
    left over the fit would wait forever. On a local cluster that is one clear error; a cluster the job
    joined may still grow (an autoscaler), so there it is a warning."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    held = num_workers * cpus_per_worker
    if total - held >= 1:
        return
    message = (
        f"{task}: the training workers hold {held:g} of the cluster's {total:g} CPUs and Ray Data needs at "
        f"least 1 more to feed them; lower {task}.train.num_workers or {task}.train.cpus_per_worker"
    )
    if _STARTED_LOCAL_CLUSTER:
        raise ConfigError(f"{message}, or raise cluster.local_num_cpus")
    log.warning("%s (or add CPUs to the cluster)", message)


class WithoutMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix`` (Ray's lines that a person cannot act
    on). Matched on the text: should Ray reword one, the line shows again and nothing else changes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Deprecation warnings that Ray's own internals raise in the job's workers and actors: nothing a user of
# dlbatch can act on.
_QUIET_WARNINGS = {"PYTHONWARNINGS": "ignore::DeprecationWarning"}


def _join(address: str, env_vars: dict[str, str]) -> None:
    """Connect to a running cluster; the job's own workers and actors there (Ray Train's split coordinator
    among them) get ``env_vars``, so they log as this driver does. A submitted job whose runtime env names
    one of them already: Ray refuses a variable named twice, and the job's own settings stand."""
    import ray

    try:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars})
    except ValueError as err:
        if "Failed to merge" not in str(err):
            raise
        log.info("the job's runtime env sets %s itself; kept", " or ".join(sorted(env_vars)))
        ray.init(address=address, log_to_driver=True)


def data_node_selector(cfg: JobConfig) -> dict[str, str] | None:
    """The label selector of the nodes for Ray Data's CPU work, when the night routes it there
    (``cluster.data_nodes``); None: Ray Data runs anywhere."""
    import ray

    mode = cfg.cluster.data_nodes
    key, value = cfg.cluster.data_label.split("=", 1)
    if mode == "off":
        return None
    if mode == "auto" and not any(
        node.get("Alive") and (node.get("Labels") or {}).get(key) == value for node in ray.nodes()
    ):
        return None
    return {key: value}


@dataclass(frozen=True)
class DataNodes:
    """Where a stage's work goes: ``data``, the label selector of Ray Data's tasks; ``elsewhere``, that of
    training workers and inference actors (both None: no routing, anything runs anywhere)."""

    data: dict[str, str] | None = None

    @property
    def elsewhere(self) -> dict[str, str] | None:
        return {key: f"!{value}" for key, value in self.data.items()} if self.data else None


def route_data_work(cfg: JobConfig, stage: str) -> DataNodes:
    """Point this driver's Ray Data work at the data nodes, or anywhere when there are none, as a stage
    starts (nodes come and go between stages): datasets made afterwards keep the routing."""
    from ray.data import DataContext

    nodes = DataNodes(data_node_selector(cfg))
    options = DataContext.get_current().execution_options
    changed, options.label_selector = options.label_selector != nodes.data, nodes.data
    if changed and not nodes.data:
        log.info("%s: no node labelled %s any more; Ray Data runs anywhere", stage, cfg.cluster.data_label)
    elif changed:
        log.info("%s: Ray Data's CPU work runs on the nodes labelled %s; training and inference on the others",
                 stage, cfg.cluster.data_label)  # fmt: skip
    return nodes


def current_data_nodes() -> DataNodes:
    """The routing this driver's current stage set (``route_data_work``)."""
    from ray.data import DataContext

    return DataNodes(DataContext.get_current().execution_options.label_selector)


def ensure_ray(cfg: JobConfig) -> None:
    """``ray.init`` once: the configured/submitted cluster if any, else a private local one on loopback."""
    import ray

    # Ray Data logs several lines per dataset it executes, a dozen per epoch in a fit: warnings only, unless
    # asked (``verbose``) or set by the user. Ray Data reads the variable whenever it configures its
    # loggers (again during executions), in this driver and, for a local cluster, in its processes.
    if cfg.verbose:
        os.environ["RAY_DATA_LOG_LEVEL"] = "INFO"
    data_log_level = os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray.data").setLevel(data_log_level)
    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    if address:
        _join(address, {"RAY_DATA_LOG_LEVEL": data_log_level, **_QUIET_WARNINGS})
        return
    # Ray turns token authentication on for a local cluster and says so as a warning on every start; there
    # is nothing to act on (turning it off is the one thing not to do), so the notice is left out.
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(WithoutMessage("Token authentication is enabled for this Ray cluster"))
    # A private local cluster has no spot nodes to drain: skip Ray Train's preemption watcher, one more
    # process per fit (seconds of CPU to start on a small machine). A submitted job keeps it; so does an explicit
    # setting. Ray Train hands this variable on from the driver to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    dashboard = cfg.cluster.local_dashboard
    missing = dashboard_unavailable() if dashboard else None
    if missing:
        # Asked for explicitly, ray.init would refuse to start at all ("Cannot include dashboard with
        # missing packages"); a laptop run should still run.
        log.warning(
            "Ray's dashboard cannot start here (%s); install 'ray[default]' for it. Running without it.",
            missing,
        )
        dashboard = False
    global _STARTED_LOCAL_CLUSTER
    num_cpus = local_num_cpus(cfg)
    # RAY_DATA_LOG_LEVEL reaches Ray Data in every worker and actor of the cluster (Ray Train's dataset
    # actors too); PYTHONWARNINGS hides deprecation warnings that Ray's own internals raise in them.
    cluster_env = {"RAY_DATA_LOG_LEVEL": data_log_level, **_QUIET_WARNINGS}
    with own_address(**cluster_env):
        context = ray.init(
            address="local",  # always a private instance: never attach to a cluster that merely runs here
            num_cpus=num_cpus,
            # On by default (cluster.local_dashboard): Ray Train's placement-group cleaner asks its state
            # API whether the controller lives. Loopback only.
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    _STARTED_LOCAL_CLUSTER = True
    if dashboard:
        where = f"dashboard at http://{context.dashboard_url}"
    else:
        where = "no dashboard (cluster.local_dashboard=true starts one)"
    log.info("local Ray: %d logical CPUs, %s", num_cpus, where)
