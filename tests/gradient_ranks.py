"""Helper run by test_parallel.py, one process per rank of a gloo group on loopback:

    python tests/gradient_ranks.py SCENARIO RANK WORLD PORT   # prints one JSON line

- ``mean``: three steps of rank-specific gradients on a channels-last CNN, averaged through shared memory
  and, from the same gradients, by gloo's all-reduce.
- ``peer-exits``: rank 1 exits right after the group is set up; rank 0 then averages and must fail.
- ``no-room``: rank 0 may write no file larger than 4 KiB, so the shared file cannot be reserved.
"""

import datetime
import json
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

from dlbatch.models import build_model, fast_layout
from dlbatch.parallel import GradientAverager


def _gradients(model: torch.nn.Module, rank: int, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    for p in model.parameters():
        # In the parameter's own layout, channels-last included, as backward() leaves them.
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def main(scenario: str, rank: int, world: int, port: int) -> dict:
    torch.set_num_threads(1)
    if scenario == "no-room" and rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model = fast_layout(build_model("image", {"num_classes": 3, "conv_channels": [4, 8, 8], "hidden": 8}))
    shared = GradientAverager(model)
    facts = {"rank": rank, "via": shared.via, "fallback": shared.fallback}
    if scenario == "peer-exits":
        if rank == 1:
            os._exit(0)
        _gradients(model, rank, 1)
        started = time.perf_counter()
        try:
            shared()
            facts["error"] = None
        except RuntimeError as e:
            facts["error"] = str(e)
        facts["failed_after_s"] = time.perf_counter() - started
        return facts
    by_all_reduce = GradientAverager(model, shared_memory=False)
    same_bits, max_diff, ranks_agree = True, 0.0, True
    for step in range(1, 4):  # three steps: both slot sets, and the first one again
        _gradients(model, rank, step)
        shared()
        ours = _flat_grads(model)
        _gradients(model, rank, step)
        by_all_reduce()
        theirs = _flat_grads(model)
        same_bits &= torch.equal(ours, theirs)
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
        gathered = [torch.empty_like(ours) for _ in range(world)]
        dist.all_gather(gathered, ours)
        ranks_agree &= all(torch.equal(g, ours) for g in gathered)
    dist.destroy_process_group()
    return {**facts, "same_bits": same_bits, "max_diff": max_diff, "ranks_agree": ranks_agree}


if __name__ == "__main__":
    scenario, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(scenario, rank, world, port)), flush=True)
    os._exit(0)  # past a peer that exited: gloo's teardown must not wait for it
