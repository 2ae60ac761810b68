"""Inference actor-pool sizing (a fixed pool sized from the cluster's resources unless configured)."""

from dlbatch.config import PredictConfig
from dlbatch.predict import READ_WRITE_CPUS, actor_pool_size

CPU_ONLY = PredictConfig()


def _with(base: PredictConfig, **fields) -> PredictConfig:
    return base.model_copy(update=fields)


def test_configured_size_wins():
    assert actor_pool_size(_with(CPU_ONLY, num_actors=3), {"CPU": 64.0, "GPU": 8.0}) == 3


def test_cpu_pool_leaves_room_for_reading_and_writing():
    assert actor_pool_size(CPU_ONLY, {"CPU": 4.0}) == 4 - READ_WRITE_CPUS
    assert actor_pool_size(_with(CPU_ONLY, cpus_per_actor=2.0), {"CPU": 16.0}) == (16 - READ_WRITE_CPUS) // 2
    assert actor_pool_size(CPU_ONLY, {"CPU": 1.0}) == 1  # never zero


def test_gpu_pool_is_one_actor_per_gpu_share():
    gpu = _with(CPU_ONLY, gpus_per_actor=1.0)
    assert actor_pool_size(gpu, {"CPU": 32.0, "GPU": 4.0}) == 4
    assert actor_pool_size(_with(gpu, gpus_per_actor=0.5), {"CPU": 32.0, "GPU": 2.0}) == 4
    assert actor_pool_size(gpu, {"CPU": 32.0}) == 1  # GPUs still coming up (autoscaler): start with one
