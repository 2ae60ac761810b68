"""bench/capacity.py's arithmetic, on rates chosen so that each answer can be worked out by hand."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "capacity", Path(__file__).parents[1] / "bench" / "capacity.py"
)
capacity = sys.modules["capacity"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(capacity)

# One GPU trains 1,000 and scores 3,000 samples/s at 32x32; a core decodes an image in 1 ms.
RATES = capacity.Rates(1000, 3000, 32, 0.001, 0.0, 1e9, 100, {})
# 10 epochs of 100,000 rows = 1,000 GPU-seconds of training, 300,000 rows to score = 100 GPU-seconds.
NIGHT = capacity.Night(rows=100_000, image_side=32, epochs=10, score_rows=300_000, window_s=3600,
                       gpus_per_node=8, cpus_per_gpu_node=16, cpus_per_cpu_node=32,
                       object_store_gb_per_node=0.1)  # fmt: skip


def test_one_gpu_when_the_window_is_wide():
    plan = capacity.plan(RATES, NIGHT)
    assert (plan.gpus, plan.gpu_nodes, plan.cpu_nodes) == (1, 1, 0)
    assert (plan.train_s, plan.score_s, plan.total_s) == pytest.approx((1000, 100, 1200))
    assert plan.decode_cores == 3  # scoring's 3,000 images/s at 1 ms each
    assert plan.fits and plan.bottleneck == "GPU compute"
    # 100,000 x 3 x 32 x 32 bytes = 0.31 GB decoded, more than half the 0.1 GB store: streamed.
    assert plan.decoded_gb == pytest.approx(0.3072) and plan.streamed


def test_a_split_that_fits_the_object_store_is_decoded_once():
    night = replace(NIGHT, object_store_gb_per_node=1.0, window_s=300)  # 8 GPUs: training needs 8,000/s
    plan = capacity.plan(replace(RATES, gpu_infer_samples_per_s=500), night)
    # Kept in the store: only scoring decodes (8 x 500 images/s = 4 cores), not training's 8,000/s.
    assert not plan.streamed and plan.decode_cores == 4


def test_the_fewest_gpus_that_fit_and_the_cpu_nodes_that_feed_them():
    assert capacity.plan(RATES, replace(NIGHT, window_s=700)).gpus == 2  # 550 s + 100 s fixed
    plan = capacity.plan(RATES, replace(NIGHT, window_s=300))  # 4 GPUs take 375 s; 8 take 237.5 s
    assert (plan.gpus, plan.gpu_nodes) == (8, 1) and plan.total_s == pytest.approx(237.5)
    # 8 GPUs score 24,000 images/s: 24 decoding cores, 8 spare on the GPU node (16 less one per GPU).
    assert plan.decode_cores == 24 and plan.cpu_nodes == 1
    assert plan.bottleneck.startswith("decoding: 24 cores")


def test_past_one_node_whole_nodes_at_ninety_percent():
    plan = capacity.plan(RATES, replace(NIGHT, window_s=150))
    # 16 GPUs: 1,100 / 14.4 + 100 = 176 s; 24: 150.9 s; 32: 1,100 / 28.8 + 100 = 138.2 s.
    assert (plan.gpus, plan.gpu_nodes) == (32, 4)
    assert plan.total_s == pytest.approx(1100 / 28.8 + 100)


def test_larger_images_cost_the_gpus_by_their_pixels_and_the_decoder_by_its_rate():
    night = replace(NIGHT, image_side=64)
    assert capacity.stage_seconds(RATES, night, 1) == pytest.approx((4000, 400))
    slow = replace(RATES, decode_per_pixel_s=1e-6)
    assert capacity.decode_s(slow, 64) == pytest.approx(0.001 + 4096e-6)


def test_a_window_shorter_than_the_fixed_cost_is_said_so():
    plan = capacity.plan(RATES, replace(NIGHT, window_s=90))
    assert plan.gpus == 1 and not plan.fits and plan.bottleneck.startswith("the window")


def test_the_network_into_a_gpu_node_limits_what_cpu_nodes_can_feed():
    # 3,000 images/s x 3 KB (3x32x32) per GPU; 10 MB/s carries 1 GPU's worth.
    plan = capacity.plan(replace(RATES, nic_bytes_per_s=1e7), replace(NIGHT, window_s=300))
    assert plan.network_gpu_limit == 1 and plan.bottleneck.startswith("the network into each GPU node")


def test_the_script_plans_from_the_benchmarks_result_files(capsys):
    result = capacity.main(["--rows", "2000000", "--image-size", "224", "--epochs", "10"])
    assert result["plan"]["fits"] and result["plan"]["gpus"] >= 1
    printed = capsys.readouterr().out
    assert (
        "bottleneck: " in printed and "measured: results-gpu-h200.json" in printed and "assumed: " in printed
    )
