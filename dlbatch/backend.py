"""The gloo process group for CPU training, set up without importing torch in Ray Train's controller.

Ray Train's controller unpickles the trainer's backend config. ``TorchConfig`` lives in a module that imports
torch, so the controller imports torch too (~1.9 s of CPU on a 2-core machine), and it does so at the start
of every fit, before it starts any worker: for those seconds it is the only thing running. This config does
the same setup for CPU training (gloo, one rank per worker) with torch imported only in the workers, which
need it anyway. GPU training keeps Ray's ``TorchConfig`` (NCCL, the CUDA device per worker).

Only this module's top level runs in the controller: torch is imported inside the functions the workers run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30


@dataclass
class GlooConfig(BackendConfig):
    """Pass as ``TorchTrainer(torch_config=GlooConfig())`` for CPU training."""

    backend: str = "gloo"  # TorchTrainer reads it; only gloo is set up here
    timeout_s: int = 1800  # a collective that waits longer raises; the fit retries up to train.max_failures

    @property
    def backend_cls(self):
        return _GlooBackend

    @property
    def framework(self):
        # What Ray's dashboard shows as the run's framework, as for TorchConfig (a private enum: without it,
        # "unspecified").
        try:
            from ray.train.v2._internal.util import TrainingFramework
        except ImportError:
            return None
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


def _address_and_port() -> tuple[str, int]:
    """This node's address and a free port on it: where rank 0 will listen for the others."""
    import socket

    addr = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as sock:
        sock.bind(("", 0))
        return addr, sock.getsockname()[1]


def _join(addr: str, port: int, rank: int, world_size: int, timeout_s: int) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(
        "gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _GlooBackend(Backend):
    def on_start(self, worker_group, backend_config: GlooConfig) -> None:
        addr, port = worker_group.execute_single(0, _address_and_port)
        size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank, _join, addr, port, rank, size, backend_config.timeout_s
                )
                for rank in range(size)
            ]
        )

    def on_shutdown(self, worker_group, backend_config: GlooConfig) -> None:
        try:
            ray.get(worker_group.execute_async(_leave), timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning("the workers' gloo process group did not shut down within %d s", SHUTDOWN_TIMEOUT_S)
