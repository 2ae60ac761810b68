"""CPU data parallelism without torch.optim or DDP: the same arithmetic as torch's, checkpoints that move
between the two, and no torch._dynamo import in the workers (the reason it exists)."""

from __future__ import annotations

import copy
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_python

from dlbatch.checkpoint import load_training_state, save_checkpoint
from dlbatch.errors import CheckpointError
from dlbatch.models import build_model, fast_layout
from dlbatch.parallel import Adam

SMALL = {
    "image": {"num_classes": 3, "conv_channels": [4, 8, 8], "hidden": 8},
    "text": {"num_classes": 3, "vocab_size": 50},
}


def _inputs(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    if kind == "image":
        return (torch.rand(5, 1, 28, 28, generator=generator),)
    lengths = torch.randint(1, 8, (5,), generator=generator)
    return torch.randint(1, 50, (5, 7), generator=generator), lengths


def _train(model, optimizer, kind: str, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(*_inputs(kind, generator)).square().mean().backward()
        optimizer.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_adam_computes_what_torch_adam_computes(kind):
    torch.manual_seed(0)
    theirs = fast_layout(build_model(kind, SMALL[kind]))  # the CNN's weights channels_last, as in training
    ours, start = copy.deepcopy(theirs), copy.deepcopy(theirs)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=3e-3), kind, steps=6, seed=1)
    _train(ours, Adam(ours.parameters(), lr=3e-3), kind, steps=6, seed=1)
    assert not _same(ours, start)  # it did train
    assert _same(ours, theirs)  # bit for bit


@pytest.mark.parametrize("first", ["torch", "dlbatch"])
def test_optimizer_state_resumes_across_the_two_adams(first, tmp_path):
    """A checkpoint written by one Adam resumes under the other and goes on exactly as an unbroken run."""
    make = {"torch": torch.optim.Adam, "dlbatch": Adam}
    then = "dlbatch" if first == "torch" else "torch"
    torch.manual_seed(0)
    start = fast_layout(build_model("image", SMALL["image"]))
    unbroken, resumed = copy.deepcopy(start), copy.deepcopy(start)
    optimizer = make[first](unbroken.parameters(), lr=3e-3)
    _train(unbroken, optimizer, "image", steps=3, seed=1)
    save_checkpoint(
        tmp_path, unbroken, optimizer, {"kind": "image", "model_args": SMALL["image"], "label_names": []}
    )
    _train(unbroken, optimizer, "image", steps=3, seed=2)

    other = make[then](resumed.parameters(), lr=1.0)  # the saved lr wins, as in torch
    load_training_state(tmp_path, resumed, other)
    _train(resumed, other, "image", steps=3, seed=2)
    assert _same(resumed, unbroken)


def test_optimizer_state_for_another_model_is_a_one_line_checkpoint_error(tmp_path):
    model = build_model("image", SMALL["image"])
    optimizer = Adam(model.parameters())
    _train(model, optimizer, "image", steps=1, seed=1)
    save_checkpoint(
        tmp_path, model, optimizer, {"kind": "image", "model_args": SMALL["image"], "label_names": []}
    )
    fewer = Adam(list(model.parameters())[:2])
    with pytest.raises(
        CheckpointError,
        match=r"optimizer\.pt: optimizer state does not fit this model \(optimizer state is for 10 parameters; the model has 2\)",
    ) as err:
        load_training_state(tmp_path, model, fewer)
    assert "\n" not in str(err.value)


def test_torch_adam_state_with_options_it_cannot_compute_is_refused():
    model = build_model("text", SMALL["text"])
    theirs = torch.optim.Adam(model.parameters(), weight_decay=0.1)
    _train(model, theirs, "text", steps=1, seed=1)
    with pytest.raises(ValueError, match="options this Adam does not compute: {'weight_decay': 0.1}"):
        Adam(model.parameters()).load_state_dict(theirs.state_dict())


def _loads_dynamo_after_a_training_step(optimizer: str) -> bool:
    """In a fresh interpreter, as in a worker: one training step with ``optimizer``; was torch._dynamo
    imported?"""
    code = f"""
import sys, torch
from dlbatch.models import build_model
from dlbatch.parallel import Adam, GradientAverager
from dlbatch.train import train_epoch
model = build_model("text", {SMALL["text"]!r})
optimizer = {optimizer}(model.parameters())
batch = {{"tokens": torch.randint(1, 50, (4, 6)), "length": torch.tensor([6, 2, 3, 1]), "y": torch.tensor([0, 1, 2, 0])}}
train_epoch(model, optimizer, [batch], "text", torch.device("cpu"), average_gradients=GradientAverager(model))
print("torch._dynamo" in sys.modules)
"""
    return fresh_python(code) == "True"


def test_a_cpu_training_step_does_not_import_the_compiler():
    assert not _loads_dynamo_after_a_training_step("Adam")
    # torch.optim does (so this check can tell the two apart).
    assert _loads_dynamo_after_a_training_step("torch.optim.Adam")


def test_cpu_data_parallel_training_matches_ddp(ray_cluster, tmp_path):
    """Two gloo workers that start from different weights and see different batches: GradientAverager and
    Adam end where DDP and torch.optim.Adam end, on every rank."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dlbatch.backend import GlooConfig

    def compare(_config) -> dict:  # defined here so that it is pickled by value, not by module
        import copy
        import sys

        import ray.train
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from dlbatch.models import build_model, fast_layout
        from dlbatch.parallel import Adam, GradientAverager

        rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(rank)  # each rank starts elsewhere: rank 0's weights must reach the others
        start = fast_layout(build_model("image", {"num_classes": 3, "conv_channels": [4, 8, 8], "hidden": 8}))

        def steps(model, optimizer, average=None):
            generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
            for _ in range(4):
                x, y = (
                    torch.rand(6, 1, 28, 28, generator=generator),
                    torch.randint(0, 3, (6,), generator=generator),
                )
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                if average:
                    average()
                optimizer.step()

        ours = copy.deepcopy(start)
        average = GradientAverager(ours)  # two workers of one host: through shared memory
        steps(ours, Adam(ours.parameters(), lr=1e-2), average)
        dynamo_loaded = "torch._dynamo" in sys.modules  # before DDP, which imports it
        ddp = DistributedDataParallel(copy.deepcopy(start))
        steps(ddp, torch.optim.Adam(ddp.parameters(), lr=1e-2))

        flat = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        theirs = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
        return {
            "dynamo_loaded": dynamo_loaded,
            "via": average.via,
            "ranks_agree": all(torch.equal(g, flat) for g in gathered),
            "moved": not torch.equal(flat, torch.cat([p.reshape(-1) for p in start.parameters()])),
            "max_diff_from_ddp": (flat - theirs).abs().max().item(),
        }

    result = TorchTrainer(
        compare,
        torch_config=GlooConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="parallel", storage_path=str(tmp_path)),
    ).fit()
    facts = result.return_value
    assert facts["ranks_agree"] and facts["moved"] and not facts["dynamo_loaded"], facts
    assert facts["max_diff_from_ddp"] <= 1e-6, facts
    if platform.machine() == "x86_64" and sys.platform == "linux":  # see x86_64_linux_only
        assert facts["via"] == "shared memory", facts


def _ranks(scenario: str, world: int, prefix: dict[int, list[str]] | None = None) -> list[dict]:
    """Run tests/gradient_ranks.py as ``world`` processes of one gloo group; each rank's JSON facts.
    ``prefix``: a command to start a rank's process under, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).parent
    procs = [
        subprocess.Popen(
            [
                *(prefix or {}).get(rank, []),
                sys.executable,
                str(here / "gradient_ranks.py"),
                scenario,
                str(rank),
                str(world),
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(here.parent)},
        )
        for rank in range(world)
    ]
    facts = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            lines = out.strip().splitlines()
            if lines:
                facts.append(json.loads(lines[-1]))
            elif proc.returncode != 0:
                raise AssertionError(f"a rank failed:\n{err[-3000:]}")
    finally:
        for proc in procs:  # a rank left waiting after another failed must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return facts


# The shared-memory average is used there only (see dlbatch/parallel.py).
x86_64_linux_only = pytest.mark.skipif(
    platform.machine() != "x86_64" or sys.platform != "linux", reason="x86-64 Linux only"
)


def _grad_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("dlbatch-grads-*")} if Path("/dev/shm").is_dir() else set()


@x86_64_linux_only
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_one_host_average_gradients_through_shared_memory(world):
    """Through the shared file every rank gets the same bits; with two ranks they are gloo's bits (a sum of
    two is the same either way round), with three the same mean to rounding. The file is gone afterwards."""
    before = _grad_files()
    facts = _ranks("mean", world)
    assert [f["via"] for f in facts] == ["shared memory"] * world, facts
    assert all(f["ranks_agree"] for f in facts), facts
    if world == 2:
        assert all(f["same_bits"] for f in facts), facts
    assert max(f["max_diff"] for f in facts) <= 1e-6, facts
    assert _grad_files() == before


@x86_64_linux_only
def test_a_rank_that_exits_fails_the_shared_memory_average_in_one_line():
    (rank0,) = _ranks("peer-exits", 2)
    assert rank0["via"] == "shared memory", rank0
    assert rank0["error"] and "\n" not in rank0["error"], rank0
    assert rank0["error"].startswith("gradient average: rank 1 (pid "), rank0
    assert rank0["error"].endswith("exited before step 1"), rank0
    assert rank0["failed_after_s"] < 10, rank0  # found by the liveness check, not a collective's timeout


@x86_64_linux_only
def test_without_room_for_the_shared_file_every_rank_averages_by_all_reduce():
    before = _grad_files()
    facts = _ranks("no-room", 2)
    assert [f["via"] for f in facts] == ["all-reduce"] * 2, facts
    assert facts[0]["fallback"] == facts[1]["fallback"], facts
    assert facts[0]["fallback"].startswith("could not reserve "), facts
    assert all(f["ranks_agree"] and f["same_bits"] for f in facts), facts  # both ways were gloo's
    assert _grad_files() == before


def _can_start_in_own_pid_namespace() -> bool:
    try:
        probe = subprocess.run(_OWN_PID_NAMESPACE + ["true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


_OWN_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


@x86_64_linux_only
def test_ranks_in_different_pid_namespaces_average_by_all_reduce():
    """Two containers can share /dev/shm but not their pids; a waiting rank could then not tell a dead peer
    from a slow one, so the ranks use gloo."""
    if not _can_start_in_own_pid_namespace():
        pytest.skip("needs unshare --pid (root)")
    facts = _ranks("mean", 2, prefix={1: _OWN_PID_NAMESPACE})
    assert [f["via"] for f in facts] == ["all-reduce"] * 2, facts
    assert all(f["fallback"] == "the ranks share /dev/shm but not one pid namespace" for f in facts), facts
    assert all(f["ranks_agree"] and f["same_bits"] for f in facts), facts
