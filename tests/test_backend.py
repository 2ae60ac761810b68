"""The gloo setup for CPU training: torch stays out of Ray Train's controller, and the workers form one group."""

from __future__ import annotations

from conftest import fresh_python


def _imports_torch_when_unpickled(config, tmp_path) -> bool:
    """Unpickle ``config`` in a fresh interpreter, as Ray Train's controller does; did that import torch?"""
    from ray import cloudpickle

    blob = tmp_path / "config.pkl"
    blob.write_bytes(cloudpickle.dumps(config))
    code = (
        f"import pickle, sys; pickle.loads(open({str(blob)!r}, 'rb').read()); print('torch' in sys.modules)"
    )
    return fresh_python(code) == "True"


def test_the_controller_unpickles_the_cpu_backend_config_without_torch(tmp_path):
    from ray.train.torch import TorchConfig

    from dlbatch.backend import GlooConfig

    assert not _imports_torch_when_unpickled(GlooConfig(), tmp_path)
    # What it replaces on CPU does import torch (so this check can tell the two apart).
    assert _imports_torch_when_unpickled(TorchConfig(backend="gloo"), tmp_path)


def test_the_workers_form_one_gloo_group(ray_cluster, tmp_path):
    workers = 3
    import ray.train
    from ray.train.torch import TorchTrainer

    from dlbatch.backend import GlooConfig

    def group_facts(_config) -> dict:  # defined here so that it is pickled by value, not by module
        import ray.train
        import torch
        import torch.distributed as dist

        rank = ray.train.get_context().get_world_rank()
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        facts = {
            "world": dist.get_world_size(),
            "rank": dist.get_rank(),
            "train_rank": rank,
            "sum": total.item(),
        }
        return {"backend": dist.get_backend(), **facts}

    result = TorchTrainer(
        group_facts,
        torch_config=GlooConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="gloo", storage_path=str(tmp_path)),
    ).fit()
    # Rank 0's answer: one group of all the workers, with Ray Train's ranks, and a collective across it.
    assert result.return_value == {
        "backend": "gloo",
        "world": workers,
        "rank": 0,
        "train_rank": 0,
        "sum": float(sum(range(1, workers + 1))),
    }
