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
  each backward pass, the mean gradient over the ranks, in one all-reduce of a flat buffer per dtype.

GPU workers keep DDP, which overlaps its all-reduce with the backward pass, and ``torch.optim.Adam``, which
has fused kernels there. Torch's own arithmetic and this one are checked against each other in
tests/test_parallel.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

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
    Without a process group, or with one rank, it does nothing."""

    def __init__(self, model: nn.Module):
        grouped = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if grouped else 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world_size > 1:
            states = [t.detach() for t in chain(model.parameters(), model.buffers())]
            _in_flat_buffers(states, lambda flat: dist.broadcast(flat, src=0))

    def __call__(self) -> None:
        if self.world_size == 1:
            return
        for p in self.params:  # every rank must add the same buffer: a gradient not computed here is zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        def mean(flat: torch.Tensor) -> None:
            flat.div_(self.world_size)  # before the sum, as DDP does: no overflow from the sum itself
            dist.all_reduce(flat)

        _in_flat_buffers([p.grad for p in self.params], mean)
