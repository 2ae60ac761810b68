"""The CNN's training step alone, in the variants a GPU fit could run it: samples/s and GPU busy of each.

No Ray and no data loading: the batches are synthetic and already on the device. So what this measures is
the step's own cost on the host and the device, without the input pipeline in front of it. Run on a GPU machine, after
``bench/gpu-run.sh`` installed its packages (the same PYTHONPATH), or on CPUs to check it runs:

    python bench/train_step.py [--device cuda] [--batch-size 512] [--seconds 4] [--channels 256,512,512]

Each variant changes one or two things from what a one-GPU dlbatch worker runs now (bf16 autocast,
channels_last weights, ``torch.optim.Adam`` with its default foreach update, no DDP wrapper, cuDNN's
default algorithm choice, no torch.compile). The DDP row shows what its gradient hooks cost a step on
several GPUs, less the all-reduce itself (one process here). The first step's time is apart (it holds
torch.compile's compilation). Writes ``bench/train_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from run import GpuUtilization, nvidia_smi_lag, pct

from dlbatch.models import build_model, fast_layout

# A one-worker fit runs its model bare: Ray's prepare_model wraps it in DDP only when the world is larger.
NOW = {"bf16": True, "channels_last": True, "fused_adam": False, "ddp": False, "cudnn_benchmark": False,
       "compile": False}  # fmt: skip
VARIANTS = [
    ("dlbatch's one-GPU step now", {}),
    ("fused Adam", {"fused_adam": True}),
    ("cudnn.benchmark", {"cudnn_benchmark": True}),
    ("fused Adam + cudnn.benchmark", {"fused_adam": True, "cudnn_benchmark": True}),
    ("in DDP (its hooks, one process)", {"ddp": True}),
    ("the plain loop's (fp32, NCHW)", {"bf16": False, "channels_last": False}),
    # Fuses elementwise kernels (fewer launches per step). Last: it compiles first (20 s for a small CNN on a
    # 2-core VM; not yet timed on a GPU machine), and a run cut short by its time limit keeps the rows before it.
    ("torch.compile (default mode)", {"compile": True}),
]


def timed_steps(
    opts: dict, device: torch.device, model_args: dict, batch: int, seconds: float, lag: float
) -> dict:
    torch.backends.cudnn.benchmark = opts["cudnn_benchmark"]
    torch.manual_seed(0)
    model = build_model("image", model_args).to(device)
    if opts["channels_last"]:
        model = fast_layout(model)
    if opts["ddp"]:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
    if opts["compile"]:
        model = torch.compile(model)
    fused = {"fused": True} if opts["fused_adam"] else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **fused)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, model_args["num_classes"], (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if opts["bf16"] else contextlib.nullcontext()

    def step():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    step()  # torch.compile compiles here
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(9):  # warm-up: cuDNN's benchmark picks its algorithms here, the allocator fills
        step()
    sync()
    steps, start, started_at = 0, time.perf_counter(), time.time()
    with GpuUtilization() as util:
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                step()
            steps += 10
        sync()
        wall = time.perf_counter() - start
    window = [(started_at, started_at + wall)]
    return {
        "samples_per_s": steps * batch / wall,
        "ms_per_step": 1000 * wall / steps,
        # Less nvidia-smi's lag: its first samples still average the variant's set-up before the window.
        "gpu_busy_pct": util.mean(window, lag),
        "gpu_busy_all_samples_pct": util.mean(window),
        "first_step_s": first_step_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed per variant")
    parser.add_argument("--channels", default="256,512,512", help="the CNN's conv_channels")
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model_args = {
        "num_classes": 10,
        "conv_channels": [int(c) for c in args.channels.split(",")],
        "hidden": args.hidden,
    }
    # A one-process group, as a one-worker fit has (the DDP row needs one).
    init = Path(tempfile.mkdtemp()) / "pg"
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init}", rank=0, world_size=1
    )
    lag = nvidia_smi_lag() if device.type == "cuda" else None
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "batch_size": args.batch_size, "model_args": model_args,
               "nvidia_smi_lag_s": lag, "variants": []}  # fmt: skip
    out = Path(__file__).with_name("train_step.json")
    print(f"{'variant':40} {'samples/s':>10} {'ms/step':>8} {'GPU busy':>9} {'1st step s':>10}")
    for name, change in VARIANTS:
        opts = {**NOW, **change}
        try:
            r = timed_steps(opts, device, model_args, args.batch_size, args.seconds, lag or 0.0)
        except Exception as exc:  # a variant that cannot run here (torch.compile, no compiler): one row
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            results["variants"].append({"name": name, **opts, "error": error})
            print(f"{name:40} failed: {error}", flush=True)
            continue
        results["variants"].append({"name": name, **opts, **r})
        # After each row: a run cut short by its time limit keeps the rows so far.
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name:40} {r['samples_per_s']:10,.0f} {r['ms_per_step']:8.2f} {pct(r['gpu_busy_pct']):>9} "
              f"{r['first_step_s']:10.2f}",
              flush=True)  # fmt: skip
    dist.destroy_process_group()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
