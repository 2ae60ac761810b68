"""The training recipe as values: the learning-rate rule, the schedule, AdamW's groups, the scheduler's
state through a checkpoint, and the augmentation's switch and shape. No Ray: these are the decisions."""

import math

import pytest
import torch

from dlbatch.checkpoint import load_training_state, save_checkpoint
from dlbatch.config import AugmentConfig, TrainConfig, load_config
from dlbatch.errors import ConfigError
from dlbatch.models import CNNArgs, ImageCNN
from dlbatch.recipe import (
    augmentation,
    augments,
    lr_factor,
    optimizer_for,
    plan_schedule,
    scaled_lr,
    scheduler_for,
    steps_per_epoch,
)

ARGS = CNNArgs(num_classes=3, in_channels=3, height=28, width=28, conv_channels=(4, 4, 4), hidden=8)


def test_the_rate_follows_the_global_batch_by_the_documented_rule():
    base = TrainConfig(lr=1e-3, lr_batch=64, batch_size=32, num_workers=2)  # global 64: the rate as given
    assert scaled_lr(base) == pytest.approx(1e-3)
    eight = base.model_copy(update={"num_workers": 8})  # global 256: 4x the batch
    assert scaled_lr(eight) == pytest.approx(2e-3)  # sqrt
    assert scaled_lr(eight.model_copy(update={"lr_scaling": "linear"})) == pytest.approx(4e-3)
    assert scaled_lr(eight.model_copy(update={"lr_scaling": "none"})) == pytest.approx(1e-3)
    assert scaled_lr(base, num_workers=8) == scaled_lr(eight)


def test_steps_follow_the_equal_shards():
    train = TrainConfig(batch_size=8, num_workers=2)
    assert steps_per_epoch(101, train) == 7  # 50 rows per rank (one dropped), 6 full batches and a part
    assert steps_per_epoch(101, train, num_workers=1) == 13
    plan = plan_schedule(train.model_copy(update={"epochs": 4, "warmup_fraction": 0.25}), 101)
    assert (plan.total_steps, plan.warmup_steps) == (28, 7)


def test_warm_up_then_cosine_to_zero():
    factors = [lr_factor(s, 4, 20, "cosine") for s in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # rising, never starting at zero
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[12] == pytest.approx(0.5)  # halfway through the decay
    assert factors[20] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)  # a step past the plan stays at 0
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 2, 9, 30)] == pytest.approx([1 / 3, 1, 1, 1])


def test_adamw_decays_weights_not_biases():
    plan = plan_schedule(TrainConfig(weight_decay=0.05), 1000)
    opt = optimizer_for(ImageCNN(ARGS), plan)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, kept = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in kept["params"])
    assert decayed["lr"] == kept["lr"] == pytest.approx(plan.peak_lr)


def _fit_steps(model, plan, steps):
    opt = optimizer_for(model, plan)
    sched = scheduler_for(opt, plan)
    for _ in range(steps):
        model(torch.rand(2, 3, 28, 28)).sum().backward()
        opt.step()
        sched.step()
    return opt, sched


def test_a_resumed_schedule_goes_on_from_its_checkpoint(tmp_path):
    plan = plan_schedule(TrainConfig(epochs=2, batch_size=10, num_workers=1), 100)  # 20 steps
    model = ImageCNN(ARGS)
    opt, sched = _fit_steps(model, plan, 7)
    save_checkpoint(tmp_path, model, opt, {"kind": "image", "model_args": {}, "label_names": []}, sched)
    fresh = ImageCNN(ARGS)
    fresh_opt = optimizer_for(fresh, plan)
    fresh_sched = scheduler_for(fresh_opt, plan)
    load_training_state(tmp_path, fresh, fresh_opt, fresh_sched)
    assert fresh_sched.last_epoch == 7
    assert fresh_sched.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(plan.peak_lr * lr_factor(7, 2, 20, "cosine"))
    fresh_sched.step()  # and the next step is the plan's step 8, not a restart of the warm-up
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(plan.peak_lr * lr_factor(8, 2, 20, "cosine"))


def test_augmentation_is_on_for_photos_only_by_default():
    auto = AugmentConfig()
    assert augments(auto, 3) and not augments(auto, 1)
    assert augments(AugmentConfig(enabled=True), 1) and not augments(AugmentConfig(enabled=False), 3)


def test_augmentation_crops_and_flips_at_the_model_size():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 12)
    out = augmentation(AugmentConfig(crop_scale=(0.3, 0.5)), 16, 12)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.allclose(out, images)  # a crop of a third to a half of the area, resized back
    halves = torch.zeros(8, 3, 16, 16)
    halves[..., 8:] = 1  # dark left half, light right half
    torch.manual_seed(1)
    out = augmentation(AugmentConfig(crop_scale=(1.0, 1.0)), 16, 16)(halves)  # the whole image: flips only
    left = out[:, :, :, :8].mean((1, 2, 3))
    assert set(left.tolist()) == {0.0, 1.0}  # each image kept or mirrored, and both happened


def test_a_bad_crop_scale_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="image.augment.crop_scale"):
        load_config(None, ["image.augment.crop_scale=[0.5, 0.2]"])
    assert math.isclose(load_config(None, []).image.augment.crop_scale[0], 0.35)


@pytest.mark.parametrize("value", ["[0, 2]", "[3, 2]", "0"])
def test_a_bad_worker_range_is_one_line(value):
    with pytest.raises(ConfigError, match=r"image\.train\.num_workers.*1 <= min <= max"):
        load_config(None, [f"image.train.num_workers={value}"])


def test_an_elastic_fit_plans_for_its_most_workers_and_runs_at_the_size_it_gets():
    from dlbatch.recipe import for_world, resized_step

    train = load_config(None, ["image.train.num_workers=[1, 4]", "image.train.batch_size=16"]).image.train
    assert train.num_workers == (1, 4) and train.max_workers == 4
    planned = plan_schedule(train, 6400)  # 4 x 16 = a global batch of 64: lr as given, 100 steps an epoch
    assert planned.peak_lr == pytest.approx(train.lr) and planned.total_steps == 3 * 100
    one = for_world(planned, train, 1)  # a quarter of the batch: half the rate (sqrt), 4x the steps
    assert one.peak_lr == pytest.approx(train.lr / 2) and one.total_steps == 3 * 400
    # 30 steps at 4 workers trained 30 x 64 samples: 120 steps at 1 worker, 60 at 2 (rounded up at 3).
    assert [resized_step(30, 4, w) for w in (1, 2, 3, 4)] == [120, 60, 40, 30]
    assert resized_step(7, 4, 3) == 10


def test_a_schedule_resumed_at_another_world_size_goes_on_from_the_same_share_of_the_fit(tmp_path):
    from dlbatch.recipe import for_world
    from dlbatch.train import Optim, _resize

    train = TrainConfig(epochs=2, batch_size=10, num_workers=(1, 2))
    at_two = for_world(plan_schedule(train, 100), train, 2)  # 5 steps an epoch, 10 in all
    model = ImageCNN(ARGS)
    opt, sched = _fit_steps(model, at_two, 6)
    save_checkpoint(tmp_path, model, opt, {"kind": "image", "model_args": {}, "label_names": []}, sched)
    at_one = for_world(at_two, train, 1)  # 10 steps an epoch, 20 in all
    fresh_opt = optimizer_for(ImageCNN(ARGS), at_one)
    optim = Optim(fresh_opt, scheduler_for(fresh_opt, at_one))
    load_training_state(tmp_path, ImageCNN(ARGS), fresh_opt, optim.scheduler)
    _resize(optim, at_one, saved_world=2, world=1)
    assert optim.scheduler.last_epoch == 12  # 6 of 10 steps = 12 of 20
    expected = at_one.peak_lr * lr_factor(12, at_one.warmup_steps, at_one.total_steps, at_one.decay)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(expected)
    # The same point of the cosine as at 2 workers (the warm-ups differ by a step), at the 1-worker peak.
    assert lr_factor(12, at_one.warmup_steps, 20, "cosine") == pytest.approx(
        lr_factor(6, at_two.warmup_steps, 10, "cosine"), rel=0.05
    )
