import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dlbatch.preprocess import preprocess_batch
from dlbatch.tokenizer import train_tokenizer


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


IMAGE_SPEC = {
    "kind": "image", "feature_column": "image", "id_column": "id", "label_column": "label",
    "label_type": "int", "label_names": [str(i) for i in range(10)], "num_classes": 10,
    "channels": 1, "height": 28, "width": 28, "resize": True,
}  # fmt: skip
CORPUS = ["the cat sat on the mat", "the dog sat", "北京天气晴朗", "上海下雨", "a cat and a dog"] * 20
TEXT_SPEC = {
    "kind": "text", "feature_column": "text", "id_column": "id", "label_column": "label",
    "label_type": "string", "label_names": ["a", "b"], "num_classes": 2,
    "tokenizer": train_tokenizer(iter([CORPUS]), vocab_size=200, min_count=1), "max_length": 4,
}  # fmt: skip


def _tokens(text: str) -> list[str]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(TEXT_SPEC["tokenizer"]).encode(text, add_special_tokens=False).tokens


def test_the_tokenizer_splits_cjk_into_characters_and_other_scripts_into_words_and_pieces():
    assert _tokens("北京下雨") == ["北", "京", "下", "雨"]  # no spaces between words: one token per character
    assert _tokens("The CAT, sat!")[:3] == ["the", "cat", "[UNK]"]  # lower-cased; unseen punctuation unknown
    assert _tokens("mate") == ["mat", "##e"]  # an unseen word from known pieces


def test_text_encoding_pads_truncates_and_keeps_lengths():
    batch = pa.table(
        {"id": [1, 2, 3], "text": ["the cat sat", "the dog sat on the mat", "北京"], "label": ["a", "b", "a"]}
    )
    cols = preprocess_batch(batch, TEXT_SPEC)
    tokens, lengths = cols["tokens"], cols["length"]
    assert tokens.shape == (3, 4) and tokens.dtype == np.int64
    assert lengths.tolist() == [3, 4, 2]  # truncated to max_length; what the GRU classifies from
    assert (tokens[0, 3], tokens[2, 2], tokens[2, 3]) == (0, 0, 0)  # padded with id 0
    assert (tokens[:, 0] > 1).all()  # known tokens (0 pad, 1 unknown)
    assert cols["y"].tolist() == [0, 1, 0]
    assert cols["reject_reason"].null_count == 3


def test_text_bad_rows_are_kept_with_reasons():
    batch = pa.table(
        {
            "id": ["x", "y", "z", "w", "v", "u"],
            "text": [None, "   ", "the cat", "cat", "\x00\x07\x1b", "😀😀"],
            "label": ["a", "a", "zebra", None, "a", "a"],
        }
    )
    reasons = preprocess_batch(batch, TEXT_SPEC)["reject_reason"].to_pylist()
    # No letter or digit in any script (control characters, emoji alone) is empty text.
    assert reasons == [
        "null text",
        "empty text",
        "unknown label 'zebra'",
        "null label",
        "empty text",
        "empty text",
    ]


def test_a_one_megabyte_document_is_encoded_from_its_start():
    huge = "the cat sat " * 90_000  # ~1 MB
    cols = preprocess_batch(pa.table({"id": [1], "text": [huge], "label": ["a"]}), TEXT_SPEC)
    assert cols["reject_reason"].to_pylist() == [None]
    assert cols["length"].tolist() == [4]
    assert (
        cols["tokens"][0].tolist()
        == preprocess_batch(pa.table({"id": [1], "text": ["the cat sat the"], "label": ["a"]}), TEXT_SPEC)[
            "tokens"
        ][0].tolist()
    )


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
        assert x.shape == (1, 1, 28, 28) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[0, 0], pixels)


def test_rgb_and_other_sizes_are_converted_when_resize_is_on():
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    cols = preprocess_batch(
        pa.table({"id": [1], "image": pa.array([_png(rgb, "JPEG")]), "label": [1]}), IMAGE_SPEC
    )
    assert cols["reject_reason"].to_pylist() == [None]
    assert cols["x"].shape == (1, 1, 28, 28)
    # pure red in grayscale (ITU-R 601-2 luma) is ~76/255
    assert cols["x"].dtype == np.uint8 and abs(float(cols["x"].mean()) - 76) < 5


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
