import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dlbatch.preprocess import count_tokens, preprocess_batch, tokenize


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


IMAGE_SPEC = {
    "kind": "image", "feature_column": "image", "id_column": "id", "label_column": "label",
    "label_type": "int", "label_names": [str(i) for i in range(10)], "num_classes": 10,
    "channels": 1, "height": 28, "width": 28, "resize": True,
}  # fmt: skip
TEXT_SPEC = {
    "kind": "text", "feature_column": "text", "id_column": "id", "label_column": "label",
    "label_type": "string", "label_names": ["a", "b"], "num_classes": 2,
    "vocab": ["the", "cat", "sat"], "max_length": 4,
}  # fmt: skip


def test_tokenize_lowercases_splits_and_keeps_nulls():
    out = tokenize(pa.array(["The cat, sat!", None, "  ", "Héllo wörld's"]))
    assert out.to_pylist() == [["the", "cat", "sat"], None, [], ["héllo", "wörld's"]]


def test_count_tokens_per_batch():
    counts = count_tokens(pa.table({"text": ["a b a", "b a", None]}), "text")
    assert dict(zip(counts["value"].to_pylist(), counts["count"].to_pylist(), strict=True)) == {
        "a": 3,
        "b": 2,
    }


def test_text_encoding_pads_truncates_and_maps_unknown():
    batch = pa.table(
        {"id": [1, 2, 3], "text": ["the cat sat", "the dog sat on the mat", "cat"], "label": ["a", "b", "a"]}
    )
    cols = preprocess_batch(batch, TEXT_SPEC)
    # 0 pad, 1 unknown, vocabulary from 2
    assert cols["tokens"].tolist() == [[2, 3, 4, 0], [2, 1, 4, 1], [3, 0, 0, 0]]
    assert cols["length"].tolist() == [3, 4, 1]
    assert cols["y"].tolist() == [0, 1, 0]
    assert cols["reject_reason"].null_count == 3


def test_text_bad_rows_are_kept_with_reasons():
    batch = pa.table(
        {
            "id": ["x", "y", "z", "w"],
            "text": [None, " ... ", "the cat", "cat"],
            "label": ["a", "a", "zebra", None],
        }
    )
    reasons = preprocess_batch(batch, TEXT_SPEC)["reject_reason"].to_pylist()
    assert reasons == ["null text", "empty text", "unknown label 'zebra'", "null label"]


def test_image_struct_binary_and_pixel_list_decode_to_the_same_tensor():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    png = _png(pixels)
    struct = pa.array(
        [{"bytes": png, "path": "a.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    outs = []
    for col in (
        struct,
        pa.array([png], pa.binary()),
        pa.array([pixels.reshape(-1).tolist()], pa.list_(pa.uint8())),
    ):
        cols = preprocess_batch(pa.table({"id": [1], "image": col, "label": [3]}), IMAGE_SPEC)
        assert cols["reject_reason"].to_pylist() == [None]
        outs.append(cols["x"])
    for x in outs:
        assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
        np.testing.assert_allclose(x[0, 0], pixels / 255, atol=1e-6)


def test_rgb_and_other_sizes_are_converted_when_resize_is_on():
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    cols = preprocess_batch(
        pa.table({"id": [1], "image": pa.array([_png(rgb, "JPEG")]), "label": [1]}), IMAGE_SPEC
    )
    assert cols["reject_reason"].to_pylist() == [None]
    assert cols["x"].shape == (1, 1, 28, 28)
    # pure red in grayscale (ITU-R 601-2 luma) is ~76/255
    assert abs(float(cols["x"].mean()) - 76 / 255) < 0.02


def test_image_bad_rows_get_reasons():
    good = _png(np.zeros((28, 28), np.uint8))
    small = _png(np.zeros((10, 10), np.uint8))
    batch = pa.table({
        "id": [1, 2, 3, 4, None],
        "image": pa.array([b"not an image", None, small, good, good], pa.binary()),
        "label": [1, 2, 3, 42, 1],
    })  # fmt: skip
    spec = {**IMAGE_SPEC, "resize": False}
    reasons = preprocess_batch(batch, spec)["reject_reason"].to_pylist()
    assert reasons[0].startswith("undecodable image")
    assert reasons[1] == "null image"
    assert reasons[2] == "image is 10x10, expected 28x28 (resize is off)"
    assert reasons[3] == "unknown label 42"
    assert reasons[4] == "null id"


def test_pixel_list_of_wrong_length_is_rejected_per_row():
    batch = pa.table(
        {"id": [1, 2], "image": pa.array([[0] * 784, [0] * 10], pa.list_(pa.uint8())), "label": [0, 0]}
    )
    assert preprocess_batch(batch, IMAGE_SPEC)["reject_reason"].to_pylist() == [
        None,
        "pixel array has 10 values, expected 784",
    ]


def test_rows_without_id_column_use_the_readers_row_hash():
    batch = pa.table({"text": ["the cat"], "label": ["a"], "row_hash": pa.array([123], pa.uint64())})
    assert preprocess_batch(batch, TEXT_SPEC)["id"].to_pylist() == [123]


@pytest.mark.parametrize("with_labels", [True, False])
def test_unlabelled_batches_give_minus_one(with_labels):
    batch = pa.table({"id": [1], "text": ["cat"]})
    assert preprocess_batch(batch, TEXT_SPEC, with_labels=with_labels)["y"].tolist() == [-1]


def _png_variants() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    out = {mode: rgb.convert(mode) for mode in ("L", "RGB", "RGBA", "LA", "1", "I;16")}
    out["P"] = rgb.quantize(16)
    with_trns = rgb.quantize(16)
    with_trns.info["transparency"] = 3
    out["P+tRNS"] = with_trns
    encoded = {}
    for name, img in out.items():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        encoded[name] = buf.getvalue()
    encoded["truncated"] = encoded["L"][: len(encoded["L"]) // 2]
    return encoded


@pytest.mark.parametrize("channels", [1, 3])
def test_png_fast_path_gives_exactly_what_pillow_gives(channels, monkeypatch):
    """libspng decodes the common case; every PNG flavour must come out as Pillow's conversion would."""
    import dlbatch.preprocess as pre

    variants = _png_variants()
    batch = pa.table({"id": list(range(len(variants))), "image": pa.array(list(variants.values())),
                      "label": [0] * len(variants)})  # fmt: skip
    spec = {**IMAGE_SPEC, "channels": channels}
    fast = preprocess_batch(batch, spec)
    monkeypatch.setattr(pre, "pyspng", None)  # the Pillow-only path, as on platforms without libspng
    reference = preprocess_batch(batch, spec)
    assert fast["reject_reason"].to_pylist() == reference["reject_reason"].to_pylist()
    assert fast["reject_reason"].to_pylist()[-1].startswith("undecodable image")
    np.testing.assert_array_equal(fast["x"], reference["x"])


def test_png_fast_path_is_taken_for_plain_8_bit_pngs():
    import dlbatch.preprocess as pre

    if pre.pyspng is None:
        pytest.skip("pyspng has no wheel for this platform")
    variants = _png_variants()
    assert pre._decode_png_fast(variants["L"], "L", 28, 28) is not None
    assert pre._decode_png_fast(variants["RGB"], "RGB", 28, 28) is not None
    assert pre._decode_png_fast(variants["RGB"], "L", 28, 28) is None  # needs a conversion: Pillow's job
