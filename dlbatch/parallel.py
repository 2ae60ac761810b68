"""Data-parallel training on CPUs without ``torch.optim`` or DDP.

Both import ``torch._dynamo``: DDP's constructor reads its config, and every ``torch.optim`` optimizer
imports it in ``add_param_group`` and ``step``. That is ~1.5 s of CPU in each worker process at the start of
every fit, for a compiler that dlbatch never runs. On a 2-core machine, where the start of a fit keeps both
cores busy, taking it out of the two workers made ``fit()`` to the first batch ~2 s shorter
(docs/PERFORMANCE.md, "Fixed cost"). CPU workers use instead:

- :class:`Adam`: ``torch.optim.Adam``'s update with its default options, computed parameter by parameter as
  torch does for CPU tensors, and the same ``state_dict`` layout, so a checkpoint's optimizer state loads
  into either.
- :class:`GradientAverager`: rank 0's weights to every rank at the start, as DDP's constructor does; after
  each backward pass, the mean gradient over the ranks. Ranks on one x86-64 Linux host (a laptop, one big
  node) average through a file in ``/dev/shm`` that all of them map; others in one gloo all-reduce of a
  flat buffer per dtype. On 2 cores gloo's all-reduce over loopback took ~2.6 ms per step, ~10% of a GRU
  step (docs/PERFORMANCE.md, "Gradient average through shared memory").

GPU workers keep DDP, which overlaps its all-reduce with the backward pass, and ``torch.optim.Adam``, which
has fused kernels there. Torch's own arithmetic and this one are checked against each other in
tests/test_parallel.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import time
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# The options torch.optim.Adam writes into its state_dict, at the values this Adam computes with.
_FIXED_OPTIONS = {
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": False,
}


class Adam:
    """Adam with ``torch.optim.Adam``'s arithmetic for its default options (no weight decay, no AMSGrad).

    ``state_dict()`` has torch's layout (per-parameter ``step``, ``exp_avg``, ``exp_avg_sq``; one parameter
    group), and ``load_state_dict`` takes torch's, restoring the saved ``lr``, ``betas`` and ``eps`` as
    torch does."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got no parameters to optimize")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:  # as torch: a parameter without a gradient is left alone, state and all
                continue
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = {
                    "step": torch.tensor(0.0),  # torch keeps it a float32 CPU tensor for CPU parameters
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            state["step"] += 1
            step = state["step"].item()
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            # The moving averages of the gradient and its square, then the bias-corrected step, in the
            # order torch computes them (the same rounding, so the weights match torch's bit for bit).
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, **_FIXED_OPTIONS}
        return {
            "state": {i: dict(s) for i, s in self.state.items()},
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore from a ``state_dict`` of this class or of ``torch.optim.Adam``; ValueError (one line)
        when it was made for other parameters or with options this Adam does not compute."""
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not groups or len(groups) != 1:
            raise ValueError("optimizer state: expected one parameter group, as dlbatch saves")
        group = groups[0]
        if len(group.get("params", ())) != len(self.params):
            raise ValueError(
                f"optimizer state is for {len(group.get('params', ()))} parameters; "
                f"the model has {len(self.params)}"
            )
        computed = ("weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
        other = {k: group[k] for k in computed if group.get(k, _FIXED_OPTIONS[k]) != _FIXED_OPTIONS[k]}
        if other:
            raise ValueError(f"optimizer state was made with options this Adam does not compute: {other}")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for position, key in enumerate(group["params"]):
            if key not in saved.get("state", {}):
                continue  # that parameter had no step yet
            entry, p = saved["state"][key], self.params[position]
            for name in ("exp_avg", "exp_avg_sq"):
                if tuple(entry[name].shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer state: {name} of parameter {position} has shape "
                        f"{tuple(entry[name].shape)}, the parameter {tuple(p.shape)}"
                    )
            state[position] = {
                "step": torch.as_tensor(entry["step"], dtype=torch.float32).clone(),
                # The layout of the parameter (channels_last included), as torch's zeros_like gives it.
                "exp_avg": torch.empty_like(p).copy_(entry["exp_avg"]),
                "exp_avg_sq": torch.empty_like(p).copy_(entry["exp_avg_sq"]),
            }
        self.state = state
        self.lr, self.betas, self.eps = (
            float(group["lr"]),
            tuple(map(float, group["betas"])),
            float(group["eps"]),
        )


def _in_flat_buffers(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run ``collective`` on the tensors packed into one flat buffer per dtype, then copy the results back
    in place (one call per dtype instead of one per tensor; works for any memory layout)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


class GradientAverager:
    """Makes a model's ranks train as one: on construction every rank takes rank 0's parameters and
    buffers; calling it after ``loss.backward()`` replaces each gradient with its mean over the ranks.
    Without a process group, or with one rank, it does nothing.

    The constructor is a collective (every rank calls it). ``via`` says how gradients travel: ``"shared
    memory"`` when all ranks could map one file in ``/dev/shm`` (``shared_memory=False`` turns that off),
    else ``"all-reduce"``; ``fallback`` says why shared memory was not used where it was tried. Either way
    every rank ends a step with the same gradients; with two ranks they are the same bits as gloo's."""

    def __init__(self, model: nn.Module, shared_memory: bool = True, timeout_s: float = 1800.0):
        grouped = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if grouped else 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.via, self.fallback = "all-reduce", None
        self._shared: _SharedMemoryMean | None = None
        if self.world_size > 1:
            states = [t.detach() for t in chain(model.parameters(), model.buffers())]
            _in_flat_buffers(states, lambda flat: dist.broadcast(flat, src=0))
            if shared_memory:
                self._shared, self.fallback = _SharedMemoryMean.open(self.params, timeout_s)
                if self._shared is not None:
                    self.via = "shared memory"

    def __call__(self) -> None:
        if self.world_size == 1:
            return
        for p in self.params:  # every rank must add the same buffer: a gradient not computed here is zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self._shared is not None:
            self._shared.mean([p.grad for p in self.params])
            return

        def mean(flat: torch.Tensor) -> None:
            flat.div_(self.world_size)  # before the sum, as DDP does: no overflow from the sum itself
            dist.all_reduce(flat)

        _in_flat_buffers([p.grad for p in self.params], mean)


class _SharedMemoryMean:
    """The mean of the ranks' gradients through one file in ``/dev/shm`` that every rank maps.

    Layout: a 64-byte header (a random token that proves a rank mapped rank 0's file, not a namesake on
    another host), one int64 step counter per rank, then two sets of one gradient slot per rank. At step k a
    rank writes ``grad / world`` into its slot of set ``k % 2``, then its counter; once every counter reads
    k, each rank sums the slots in rank order, so all ranks get the same bits. Two sets make the next step's
    writes safe: a rank can only write set ``k % 2`` again at step k + 2, after every rank reached step
    k + 1, i.e. finished reading step k.

    The counter is written after the slot by the same thread; x86-64 keeps stores in order for other cores,
    which is what this relies on, so it is used on x86-64 only (other CPUs may reorder them and there is
    no portable fence in Python). Rank 0 unlinks the file once all ranks have it mapped, a fraction of a
    second after making it: a fit killed later leaves nothing in ``/dev/shm``."""

    _DIR = "/dev/shm"
    _HEADER = 64
    _TOKEN = 16

    def __init__(
        self,
        raw: torch.Tensor,
        rank: int,
        world: int,
        shapes: list[torch.Size],
        pids: list[int],
        timeout_s: float,
    ):
        self.rank, self.world, self.pids, self.timeout_s = rank, world, pids, timeout_s
        self.step = 0
        counters_end, _ = self._layout(world, sum(s.numel() for s in shapes))
        self.counters = raw[self._HEADER : self._HEADER + 8 * world].view(torch.int64).numpy()
        slots = raw[counters_end:].view(torch.float32).view(2, world, -1)
        # Per slot set, per gradient, each rank's view of it: made once, the shapes never change.
        self.views: list[list[list[torch.Tensor]]] = [[], []]
        offset = 0
        for shape in shapes:
            n = shape.numel()
            for which in (0, 1):
                self.views[which].append(
                    [slots[which, r, offset : offset + n].view(shape) for r in range(world)]
                )
            offset += n

    @classmethod
    def _layout(cls, world: int, numel: int) -> tuple[int, int]:
        """Where the slots start, and the file's size in bytes."""
        counters_end = cls._HEADER + _round_up(8 * world, 64)
        return counters_end, counters_end + 2 * world * numel * 4

    @classmethod
    def open(
        cls, params: list[torch.Tensor], timeout_s: float
    ) -> tuple[_SharedMemoryMean | None, str | None]:
        """Collective: every rank maps rank 0's file, or all get ``(None, why)``."""
        rank, world = dist.get_rank(), dist.get_world_size()
        _, nbytes = cls._layout(world, sum(p.numel() for p in params))
        why = None
        if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
            why = f"shared memory is used on x86-64 Linux only, not {platform.system()} {platform.machine()}"
        elif any(p.dtype != torch.float32 for p in params):
            why = "shared memory averages float32 gradients only"
        path, token = None, None
        if rank == 0 and why is None:
            path, token = (
                os.path.join(cls._DIR, f"dlbatch-grads-{secrets.token_hex(8)}"),
                secrets.token_bytes(cls._TOKEN),
            )
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    # Reserve the pages now: a tmpfs that runs out later would kill the worker with SIGBUS
                    # on a write into the mapping, where this fails with one clear error.
                    os.posix_fallocate(fd, 0, nbytes)
                    os.pwrite(fd, token, 0)
                finally:
                    os.close(fd)
            except OSError as e:
                why = f"could not reserve {_size(nbytes)} in {cls._DIR}: {e.strerror or e}"
                _unlink(path)
                path = None
        shared = [path, token, why]
        dist.broadcast_object_list(shared, src=0)
        path, token, why = shared
        raw = None
        if path is not None:
            try:
                raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
                if bytes(raw[: cls._TOKEN].numpy()) != token:
                    raw, why = None, f"rank {rank} found another file at {path} (ranks on several hosts)"
            except (OSError, RuntimeError):
                raw, why = None, f"rank {rank} could not map {path} (ranks on several hosts)"
        # The pid lets a waiting rank tell a dead peer from a slow one; that needs one pid namespace (two
        # containers can share /dev/shm and not their pids).
        facts: list[Any] = [None] * world
        dist.all_gather_object(facts, (raw is not None, why, os.getpid(), _pid_namespace()))
        if rank == 0 and path is not None:
            _unlink(path)  # every rank has mapped it or given up: the mappings outlive the name
        if not all(mapped for mapped, _, _, _ in facts):
            return None, next((w for _, w, _, _ in facts if w), "a rank could not map the file")
        if len({ns for _, _, _, ns in facts}) != 1 or facts[0][3] is None:
            return None, "the ranks share /dev/shm but not one pid namespace"
        pids = [pid for _, _, pid, _ in facts]
        return cls(raw, rank, world, [p.shape for p in params], pids, timeout_s), None

    def mean(self, grads: list[torch.Tensor]) -> None:
        """Replace each gradient in place with its mean over the ranks (a collective)."""
        self.step += 1
        views = self.views[self.step % 2]
        for g, per_rank in zip(grads, views, strict=True):
            torch.div(g, self.world, out=per_rank[self.rank])  # before the sum, as the all-reduce does
        self.counters[self.rank] = self.step
        self._wait_for_all()
        for g, per_rank in zip(grads, views, strict=True):
            g.copy_(per_rank[0])
            for v in per_rank[1:]:
                g.add_(v)

    def _wait_for_all(self) -> None:
        # Short naps, no spinning: a rank that spins holds its core, and Ray's helper processes then take
        # their share from the rank being waited for. A nap is ~0.17 ms (measured idle), a step 15-40 ms
        # on 2 cores.
        started = time.perf_counter()
        checked = started
        while self.counters.min() < self.step:
            time.sleep(1e-4)
            now = time.perf_counter()
            if now - checked >= 1.0:
                checked = now
                self._fail_if_a_rank_is_gone(now - started)

    def _fail_if_a_rank_is_gone(self, waited_s: float) -> None:
        for r in np.flatnonzero(self.counters < self.step):
            if not _alive(self.pids[r]):
                raise RuntimeError(
                    f"gradient average: rank {r} (pid {self.pids[r]}) exited before step {self.step}"
                )
        if waited_s > self.timeout_s:
            late = ", ".join(str(r) for r in np.flatnonzero(self.counters < self.step))
            raise RuntimeError(
                f"gradient average: waited {waited_s:.0f} s for rank(s) {late} at step {self.step}"
            )


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie does not: it has exited, its parent not yet reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
