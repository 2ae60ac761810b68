"""Checkpoints are input: loaded with weights_only, and a tampered or truncated one is a clear error."""

import os
import pickle

import pytest
import torch

from dlbatch.checkpoint import load_model, load_training_state, save_checkpoint
from dlbatch.errors import CheckpointError
from dlbatch.models import CNNArgs, ImageCNN

ARGS = {
    "num_classes": 3,
    "in_channels": 1,
    "height": 28,
    "width": 28,
    "conv_channels": [4, 4, 4],
    "hidden": 8,
}
META = {"kind": "image", "model_args": ARGS, "label_names": ["a", "b", "c"], "epoch": 2}


@pytest.fixture
def ckpt(tmp_path):
    model = ImageCNN(CNNArgs(**{**ARGS, "conv_channels": (4, 4, 4)}))
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, META)
    return tmp_path, model


def test_round_trip_restores_weights_and_optimizer(ckpt):
    path, model = ckpt
    loaded, meta = load_model(path)
    assert meta["label_names"] == ["a", "b", "c"]
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    fresh = ImageCNN(CNNArgs(**{**ARGS, "conv_channels": (4, 4, 4)}))
    opt = torch.optim.Adam(fresh.parameters())
    assert load_training_state(path, fresh, opt)["epoch"] == 2
    assert opt.state_dict()["state"]  # Adam moments came back


def test_truncated_weights(ckpt):
    path, _ = ckpt
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot load checkpoint weights"):
        load_model(path)


def test_pickled_code_is_refused(ckpt, tmp_path_factory):
    path, _ = ckpt
    marker = tmp_path_factory.mktemp("x") / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path / "model.pt", "wb") as fh:
        pickle.dump(Exploit(), fh)
    with pytest.raises(CheckpointError, match="cannot load checkpoint weights"):
        load_model(path)
    assert not marker.exists()


def test_weights_for_another_model(ckpt):
    path, _ = ckpt
    torch.save({"foo": torch.zeros(1)}, path / "model.pt")
    with pytest.raises(CheckpointError, match="weights do not match the model"):
        load_model(path)


def test_missing_or_corrupt_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="not a dlbatch checkpoint"):
        load_model(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_model(tmp_path)


@pytest.fixture
def text_ckpt(tmp_path):
    from dlbatch.models import GRUArgs, TextGRU
    from dlbatch.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter([["the cat sat", "北京下雨"] * 10]), vocab_size=100, min_count=1)
    args = {"num_classes": 2, "vocab_size": 100}
    meta = {"kind": "text", "model_args": args, "label_names": ["a", "b"], "epoch": 0, "tokenizer": tokenizer}
    save_checkpoint(tmp_path, TextGRU(GRUArgs(**args)), None, meta)
    return tmp_path, tokenizer


def test_a_text_model_keeps_its_tokenizer_in_its_own_json_file(text_ckpt):
    path, tokenizer = text_ckpt
    assert (path / "tokenizer.json").read_text() == tokenizer
    assert "tokenizer" not in (path / "meta.json").read_text().split('"tokenizer_sha256"')[0]
    _, meta = load_model(path)
    assert meta["tokenizer"] == tokenizer


def test_a_tampered_tokenizer_is_refused(text_ckpt):
    path, tokenizer = text_ckpt
    (path / "tokenizer.json").write_text(tokenizer.replace('"cat"', '"dog"'))  # still valid JSON
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: not the tokenizer this model was trained with"
    ):
        load_model(path)


def test_a_text_model_without_its_tokenizer_is_refused(text_ckpt):
    path, _ = text_ckpt
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing from checkpoint"):
        load_model(path)


def test_a_text_model_of_the_word_vocabulary_format_says_to_retrain(text_ckpt):
    import json

    path, _ = text_ckpt
    meta = json.loads((path / "meta.json").read_text())
    del meta["tokenizer_sha256"]
    (path / "meta.json").write_text(json.dumps({**meta, "vocab": ["the", "cat"]}))
    with pytest.raises(
        CheckpointError, match=r"older dlbatch \(a word vocabulary, no tokenizer\.json\); retrain"
    ):
        load_model(path)
