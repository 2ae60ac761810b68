import pytest
import torch

from dlbatch.models import CNNArgs, GRUArgs, ImageCNN, TextGRU, build_model


def test_cnn_output_shape_default_input():
    model = ImageCNN(CNNArgs(num_classes=10))
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    # the founding document's 576 = 64 * 3 * 3 comes out of the computation, not a constant
    assert model.head[1].in_features == 576


@pytest.mark.parametrize(("h", "w", "c"), [(32, 32, 3), (64, 48, 1)])
def test_cnn_flatten_width_follows_input_size(h, w, c):
    model = ImageCNN(CNNArgs(num_classes=3, in_channels=c, height=h, width=w))
    assert model(torch.rand(2, c, h, w)).shape == (2, 3)


def test_cnn_rejects_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        ImageCNN(CNNArgs(num_classes=2, height=8, width=8))


def test_gru_classifies_from_last_valid_state_not_padding():
    torch.manual_seed(0)
    model = TextGRU(GRUArgs(num_classes=4, vocab_size=50)).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    longer_padding = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        a = model(tokens, torch.tensor([3]))
        b = model(longer_padding, torch.tensor([3]))
        c = model(tokens[:, :3], torch.tensor([3]))
        d = model(torch.tensor([[5, 6, 7, 9, 0, 0, 0, 0]]), torch.tensor([4]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, d)  # the 4th token does change the prediction when it is valid


def test_gru_batch_of_mixed_lengths():
    model = TextGRU(GRUArgs(num_classes=2, vocab_size=20))
    out = model(torch.randint(1, 20, (3, 6)), torch.tensor([6, 1, 3]))
    assert out.shape == (3, 2)


def test_build_model_from_checkpoint_args():
    m = build_model("image", {"num_classes": 2, "conv_channels": [8, 8, 8], "hidden": 4})
    assert isinstance(m, ImageCNN)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("audio", {})


def test_fast_layout_keeps_values_and_checkpoints_portable():
    from dlbatch.models import fast_layout

    torch.manual_seed(0)
    plain = ImageCNN(CNNArgs(num_classes=10, in_channels=3, height=32, width=32)).eval()
    fast = fast_layout(ImageCNN(CNNArgs(num_classes=10, in_channels=3, height=32, width=32))).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    back = ImageCNN(CNNArgs(num_classes=10, in_channels=3, height=32, width=32))
    back.load_state_dict(fast.state_dict())  # a checkpoint saved in either layout loads into the other
    assert torch.equal(back.features[0].weight, plain.features[0].weight)
