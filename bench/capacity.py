"""How many GPU and CPU nodes a night needs to finish in its window, and what limits it (docs/SCALING.md).

From a night's size (training rows, image size, epochs, rows to score) and rates, some measured by this
project's benchmarks and some assumed (each marked), it plans: the GPUs whose training and inference fit
the window, the CPU cores that keep those GPUs fed with decoded images, how many CPU-only nodes that takes
beyond the GPU nodes' own cores, and which limit binds first (GPU compute, decoding, the network into the
GPU nodes, or a window shorter than the fixed cost).

    python bench/capacity.py --rows 2000000 --image-size 224 --epochs 10 [--score-rows 5000000]
        [--window-h 6] [--gpus-per-node 8] [--cpus-per-gpu-node 96] [--cpus-per-cpu-node 32]

Prints the plan as text, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Rates:
    """Per-device rates at the seed CNN's measured input (``measured_side`` pixels square) and what scales
    them to other sizes. ``source`` says, per field, whether it was measured (and where) or assumed."""

    gpu_train_samples_per_s: float  # one GPU, training steps, at measured_side
    gpu_infer_samples_per_s: float  # one GPU, forward only, at measured_side
    measured_side: int
    decode_fixed_s: float  # per image, whatever its size (reading, the decoder's setup, the batch)
    decode_per_pixel_s: float  # per decoded pixel (JPEG/PNG decode and resize)
    nic_bytes_per_s: float  # into one GPU node
    fixed_s: float  # a night's fixed cost: Ray start, fit() to the first batch, scoring's start
    source: dict[str, str]


def measured_rates(
    results: Path = HERE / "results-gpu-h200.json", cpu: Path = HERE / "results.json"
) -> Rates:
    """Rates from the benchmarks' result files, with the rest assumed."""
    gpu, host = json.loads(results.read_text()), json.loads(cpu.read_text())
    train = gpu["training"]["image"]["dlbatch_samples_per_s"]
    # The CPU run's inference: 28x28 PNGs decoded and scored end to end on its cores; at 784 pixels nearly
    # all of an image's time is the fixed part.
    per_core = host["inference"]["dlbatch_images_per_s"] / host["machine"]["cpus"]
    return Rates(
        gpu_train_samples_per_s=train,
        gpu_infer_samples_per_s=3 * train,  # a forward is about a third of a training step's work
        measured_side=28,
        decode_fixed_s=1 / per_core,
        decode_per_pixel_s=(1 / 1250) / (224 * 224),  # ~1,250 224-px JPEGs/s per core (assumed)
        nic_bytes_per_s=25e9 / 8,  # 25 Gbit/s per node (assumed)
        fixed_s=gpu["fixed_cost_s"]["total"] + 60,  # measured fit start, plus a minute for scoring (assumed)
        source={
            "gpu_train_samples_per_s": f"measured: {results.name} training.image (H200, the seed CNN widened)",
            "gpu_infer_samples_per_s": "assumed: 3x the training rate (forward only)",
            "decode_fixed_s": f"measured: {cpu.name} inference images/s per core (28x28 PNG)",
            "decode_per_pixel_s": "assumed: 1,250 224x224 JPEG decodes/s per core (Ray's batch-inference figures)",
            "nic_bytes_per_s": "assumed: 25 Gbit/s into each GPU node",
            "fixed_s": f"measured: {results.name} fixed_cost_s.total, plus 60 s assumed for scoring's start",
            "gpu_scaling": "assumed: linear in GPUs (data-parallel, 90% efficiency past one node)",
        },
    )


@dataclass(frozen=True)
class Night:
    rows: int  # training rows
    image_side: int  # decoded images are side x side
    epochs: int
    score_rows: int
    channels: int = 3
    window_s: float = 6 * 3600
    gpus_per_node: int = 8
    cpus_per_gpu_node: int = 96
    cpus_per_cpu_node: int = 32
    object_store_gb_per_node: float = 200.0  # Ray's default is 30% of a node's memory, at most 200 GB


@dataclass(frozen=True)
class Plan:
    gpus: int
    gpu_nodes: int
    cpu_nodes: int
    decode_cores: int  # cores decoding at once to keep the GPUs fed
    train_s: float
    score_s: float
    total_s: float
    bottleneck: str
    network_gpu_limit: int  # GPUs per node beyond which decoded batches saturate its network
    fits: bool
    decoded_gb: float  # the training split decoded
    streamed: (
        bool  # decoded every epoch: more than half the GPU nodes' object stores (train.materialize=auto)
    )


def decode_s(rates: Rates, side: int) -> float:
    """One core's seconds to decode and resize one image."""
    return rates.decode_fixed_s + rates.decode_per_pixel_s * side * side


def gpu_rate(rates: Rates, side: int, train: bool) -> float:
    """One GPU's samples/s at ``side``: a CNN's work grows with the pixels."""
    base = rates.gpu_train_samples_per_s if train else rates.gpu_infer_samples_per_s
    return base * (rates.measured_side / side) ** 2


def _efficiency(gpus: int, per_node: int) -> float:
    return 1.0 if gpus <= per_node else 0.9


def stage_seconds(rates: Rates, night: Night, gpus: int) -> tuple[float, float]:
    """(training, scoring) seconds on ``gpus`` GPUs, decoding assumed to keep up."""
    speed = gpus * _efficiency(gpus, night.gpus_per_node)
    train = night.epochs * night.rows / (gpu_rate(rates, night.image_side, True) * speed)
    score = night.score_rows / (gpu_rate(rates, night.image_side, False) * speed)
    return train, score


def plan(rates: Rates, night: Night, max_gpus: int = 4096) -> Plan:
    """The fewest GPUs whose stages fit the window (or ``max_gpus``), and the CPUs that feed them."""
    # Within a node 1, 2, 4, ... GPUs; beyond one, whole nodes.
    steps = [2**i for i in range(int(math.log2(night.gpus_per_node)) + 1)]
    steps += range(2 * night.gpus_per_node, max_gpus + 1, night.gpus_per_node)
    gpus = next((g for g in steps if rates.fixed_s + sum(stage_seconds(rates, night, g)) <= night.window_s),
                max_gpus)  # fmt: skip
    if rates.fixed_s >= night.window_s:
        gpus = 1  # no number of GPUs helps
    gpus = min(gpus, max_gpus)
    train_s, score_s = stage_seconds(rates, night, gpus)
    gpu_nodes = math.ceil(gpus / night.gpus_per_node)
    # Training and scoring each need decoded images at the GPUs' pace (training's only when streamed).
    t_img = decode_s(rates, night.image_side)
    decoded_gb = night.rows * night.channels * night.image_side**2 / 1e9
    streamed = decoded_gb > 0.5 * gpu_nodes * night.object_store_gb_per_node
    speed = gpus * _efficiency(gpus, night.gpus_per_node)
    train_pace = gpu_rate(rates, night.image_side, True) * speed if streamed else 0.0
    pace = max(train_pace, gpu_rate(rates, night.image_side, False) * speed)
    decode_cores = math.ceil(pace * t_img)
    # The GPU nodes' own cores, less one per GPU for its training or inference process.
    spare = gpu_nodes * max(night.cpus_per_gpu_node - night.gpus_per_node, 0)
    cpu_nodes = math.ceil(max(decode_cores - spare, 0) / night.cpus_per_cpu_node)
    # Decoded batches from CPU nodes cross the network into each GPU node.
    bytes_per_sample = night.channels * night.image_side**2
    per_gpu_bytes = gpu_rate(rates, night.image_side, False) * bytes_per_sample
    network_gpu_limit = max(int(rates.nic_bytes_per_s // per_gpu_bytes), 0)
    total = rates.fixed_s + train_s + score_s
    if rates.fixed_s >= night.window_s:
        bottleneck = "the window: shorter than the night's fixed cost"
    elif total > night.window_s:
        bottleneck = f"GPU compute: {max_gpus} GPUs do not finish in the window"
    elif cpu_nodes and network_gpu_limit < night.gpus_per_node:
        bottleneck = (f"the network into each GPU node: decoded images for {network_gpu_limit} of its "
                      f"{night.gpus_per_node} GPUs at most (decode on the GPU nodes, or send encoded images)")  # fmt: skip
    elif cpu_nodes:
        bottleneck = (
            f"decoding: {decode_cores} cores at once, {cpu_nodes} CPU nodes beyond the GPU nodes' own"
        )
    else:
        bottleneck = "GPU compute"
    return Plan(gpus, gpu_nodes, cpu_nodes, decode_cores, train_s, score_s, total, bottleneck,
                network_gpu_limit, total <= night.window_s, decoded_gb, streamed)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, required=True, help="training rows")
    parser.add_argument("--image-size", type=int, required=True, help="decoded images are N x N")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--score-rows", type=int, help="rows to score (default: --rows)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--window-h", type=float, default=6.0)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-gpu-node", type=int, default=96)
    parser.add_argument("--cpus-per-cpu-node", type=int, default=32)
    parser.add_argument("--object-store-gb", type=float, default=200.0, help="per GPU node")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    night = Night(args.rows, args.image_size, args.epochs, args.score_rows or args.rows, args.channels,
                  args.window_h * 3600, args.gpus_per_node, args.cpus_per_gpu_node, args.cpus_per_cpu_node,
                  args.object_store_gb)  # fmt: skip
    rates = measured_rates()
    found = plan(rates, night)
    result = {"plan": asdict(found), "night": asdict(night), "rates": asdict(rates)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{found.gpus} GPUs on {found.gpu_nodes} GPU nodes, {found.cpu_nodes} CPU nodes "
            f"({found.decode_cores} decoding cores at once)"
        )
        print(
            f"training {found.train_s / 3600:.2f} h, scoring {found.score_s / 3600:.2f} h, with the fixed cost "
            f"{found.total_s / 3600:.2f} h of a {args.window_h:g} h window: {'fits' if found.fits else 'does NOT fit'}"
        )
        print(
            f"the training split decoded: {found.decoded_gb:,.0f} GB, "
            f"{'streamed (decoded every epoch)' if found.streamed else 'kept in the object store'}"
        )
        print(f"bottleneck: {found.bottleneck}")
        print(f"the network into a GPU node carries decoded images for {found.network_gpu_limit} GPUs")
        for name, source in rates.source.items():
            print(f"  {name}: {source}")
    return result


if __name__ == "__main__":
    main()
