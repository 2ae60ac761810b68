"""A pretrained transformers backbone (image.model.arch / weights): its weights saved here by the library
itself, loaded, frozen, fine-tuned, checkpointed, resumed and used for scoring; and the one-line errors
for weights that are missing or made for another model."""

from __future__ import annotations

import shutil

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import config_for
from safetensors.torch import save_file

from dlbatch.backbone import check_weights
from dlbatch.checkpoint import load_model
from dlbatch.config import load_config
from dlbatch.errors import ConfigError
from dlbatch.flow import run_predict, run_train
from dlbatch.models import model_args_for

transformers = pytest.importorskip("transformers")
TINY = {
    "num_channels": 1,
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "layer_type": "basic",
}


def _pretrained(directory, classes: int = 5, **sizes):
    """A small ResNet of the library's own, trained a few steps on generated images, saved as a user's
    fine-tuning source would be (save_pretrained: config.json and model.safetensors)."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(**{**TINY, **sizes}, num_labels=classes)
    model = transformers.ResNetForImageClassification(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, classes, (16,))
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory)
    return model


def _args(weights, *extra):
    cfg = load_config(None, ["image.model.arch=resnet", f"image.model.weights={weights}", *extra])
    return model_args_for(cfg.image, 10)


def _body(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("net.classifier.") and "num_batches" not in k}


def _checkpoints(out) -> list:
    return sorted((out / "ray_results/image-2026-11-25").glob("checkpoint_*"))


def test_a_backbone_is_fine_tuned_from_its_weights_resumed_and_scores(ray_cluster, demo_root, tmp_path):
    source = _pretrained(tmp_path / "resnet")
    pretrained = {f"net.{k}": v for k, v in source.state_dict().items()}
    settings = ("image.model.arch=resnet", f"image.model.weights={tmp_path / 'resnet'}",
                "image.model.freeze_epochs=1", "image.train.batch_size=16", "image.train.lr=0.01",
                "quality_margin=0.05")  # a tiny ResNet on 1,500 digits: not a test of the floor  # fmt: skip
    out = tmp_path / "out"
    [first] = run_train(config_for(out, "image", demo_root, *settings, "image.train.epochs=2"))
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    # After the first epoch the layers were still frozen: they are the pretrained weights exactly (so
    # they were loaded), while the new 10-class head (the source's had 5) learned; then they learned too.
    frozen, meta = load_model(_checkpoints(out)[0])
    assert meta["model_args"]["arch"] == "resnet" and meta["model_args"]["num_classes"] == 10
    body = _body(frozen.state_dict())
    assert body and all(torch.equal(v, pretrained[k]) for k, v in body.items() if "running" not in k)
    tuned, _ = load_model(_checkpoints(out)[1])
    assert any(not torch.equal(v, body[k]) for k, v in _body(tuned.state_dict()).items())

    # A rerun after the model went missing (as after a job killed between the fit and publishing) with a
    # third epoch resumes from the fit's last checkpoint: the first two are not trained again.
    shutil.rmtree(out / "runs/2026-11-25/image/model")
    [second] = run_train(config_for(out, "image", demo_root, *settings, "image.train.epochs=3"))
    assert [h["epoch"] for h in second["history"]] == [0, 1, 2]
    assert second["history"][2]["resumed_from_epoch"] == 1
    assert second["history"][:2] == first["history"]
    assert second["test_accuracy"] > 0.2  # 10 classes: chance is 0.1 (a tiny ResNet, three short epochs)

    [scored] = run_predict(config_for(out, "image", demo_root, *settings), model=second["paths"]["model"])
    predictions = pads.dataset(out / "runs/2026-11-25/image/predictions", format="parquet").to_table()
    assert predictions.num_rows == pq.read_table(demo_root["image"]["score"]).num_rows
    assert scored["rows"]["score"]["used"] == predictions.num_rows
    assert set(predictions["pred_label"].to_pylist()) <= set(meta["label_names"])


def test_missing_weights_are_one_line_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^image\.model\.weights: .*/nowhere: no such file or directory$"):
        _args(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: no model\.safetensors or pytorch_model\.bin or model\.pt"):
        _args(tmp_path / "empty")


def test_weights_of_another_size_name_the_first_key_that_differs(tmp_path):
    _pretrained(tmp_path / "wide", hidden_sizes=[8, 32])
    # One safetensors file carries no config: the architecture is the one the config names (here the
    # library's default ResNet sizes shaped like the small one), and the first key that differs is named.
    args = _args(tmp_path / "wide")
    args["library_config"] = {**args["library_config"], "hidden_sizes": [8, 16]}
    with pytest.raises(
        ConfigError, match=r"model\.safetensors: key 'resnet\.encoder\.stages\.1\..*' has shape"
    ):
        check_weights(args, str(tmp_path / "wide"))
    file = tmp_path / "weights.safetensors"
    save_file({"not.a.key": torch.zeros(2)}, file)
    with pytest.raises(
        ConfigError, match=r"weights\.safetensors: key 'not\.a\.key' is not in a resnet model"
    ):
        check_weights({**args, "library_config": TINY}, str(file))


def test_weights_of_another_architecture_are_refused(tmp_path):
    config = transformers.ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    transformers.ConvNextForImageClassification(config).save_pretrained(tmp_path / "convnext")
    with pytest.raises(ConfigError, match=r"config\.json is a convnext model, not image\.model\.arch=resnet"):
        _args(tmp_path / "convnext")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt: not a state_dict or safetensors file"):
        check_weights(_args(tmp_path / "convnext", "image.model.weights=null"), str(tmp_path / "junk.pt"))


def test_weights_need_a_backbone():
    with pytest.raises(ConfigError, match="weights and freeze_epochs need a backbone"):
        load_config(None, ["image.model.weights=/some/where"])


def test_a_frozen_backbone_learns_only_its_head_until_the_freeze_ends():
    from dlbatch.config import TrainConfig
    from dlbatch.models import build_model
    from dlbatch.recipe import optimizer_for, plan_schedule, scheduler_for

    args = {**_args("/unused", "image.model.weights=null"), "library_config": TINY}
    model = build_model("image", args)
    plan = plan_schedule(TrainConfig(epochs=3, batch_size=10, num_workers=1), 100, freeze_epochs=1)
    assert plan.freeze_steps == 10
    opt = optimizer_for(model, plan)
    sched = scheduler_for(opt, plan)
    head = {id(p) for n, p in model.named_parameters() if n.startswith("net.classifier.")}
    rates = []
    for _ in range(12):
        rates.append([(all(id(p) in head for p in g["params"]), g["lr"]) for g in opt.param_groups])
        sched.step()
    assert all(lr == 0 for step in rates[:10] for is_head, lr in step if not is_head)  # frozen layers
    assert all(lr > 0 for step in rates[1:] for is_head, lr in step if is_head)  # the head learns
    assert all(lr > 0 for is_head, lr in rates[10] if not is_head)  # and the layers after the freeze
