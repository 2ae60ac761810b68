"""Input profiles and drift between nights: the profile of each split in summary.json, distances to the
previous night and to the champion's training data, warn and block."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import config_for
from PIL import Image

from dlbatch.demo import make_chinese_text_table, make_text_table
from dlbatch.errors import QualityError
from dlbatch.flow import run_nightly
from dlbatch.preprocess import preprocess_batch, to_arrow
from dlbatch.profile import compare, distances, finish, merge, partial, total_variation
from dlbatch.store import SUCCESS
from dlbatch.tokenizer import train_tokenizer


def test_distances_are_total_variation_and_shifts_in_standard_deviations():
    assert total_variation({"a": 50, "b": 50}, {"a": 5, "b": 5}) == 0.0
    assert total_variation({"a": 10}, {"b": 3}) == 1.0
    assert total_variation({"a": 75, "b": 25}, {"a": 25, "b": 75}) == 0.5
    night = {"rows": 9, "labels": {"0": 9}, "sizes": {"28x28": 9}, "modes": {"L": 9}, "pixel_mean": 200.0,
             "pixel_std": 40.0}  # fmt: skip
    before = {**night, "pixel_mean": 40.0, "pixel_std": 50.0}
    assert distances(night, before, "image") == {
        "labels": 0.0, "sizes": 0.0, "modes": 0.0, "pixel_mean": 3.2, "pixel_std": 0.2
    }  # fmt: skip
    text = {"rows": 4, "labels": {"x": 4}, "lengths": {"<=8": 4}, "unknown": 0.6}
    found = compare(
        {"score": text}, {"previous": ("last night", {"score": {**text, "unknown": 0.01}})}, "text", 0.2
    )
    assert found["distances"] == {"score": {"labels": {"previous": 0.0}, "lengths": {"previous": 0.0},
                                            "unknown": {"previous": 0.59}}}  # fmt: skip
    assert found["drifted"] == [
        {"split": "score", "feature": "unknown", "against": "previous", "distance": 0.59}
    ]


def test_a_profile_sums_usable_rows_only_and_merges_across_batches():
    def batch(means, squares, reasons):
        return pa.table({
            "y": pa.array([0, 1, 1][: len(means)]), "prof_size": pa.array(["28x28", "32x32", "28x28"][: len(means)]),
            "prof_mode": pa.array(["L", "RGB", "L"][: len(means)]), "prof_mean": pa.array(means, pa.float64()),
            "prof_sq": pa.array(squares, pa.float64()), "reject_reason": pa.array(reasons, pa.string()),
        })  # fmt: skip

    first = partial(
        batch([10.0, 20.0, 99.0], [200.0, 500.0, 0.0], [None, None, "undecodable image"]),
        "image",
        "y",
        ["a", "b"],
    )
    second = partial(batch([30.0], [1000.0], [None]), "image", "y", ["a", "b"])
    profile = finish(merge([first, second]), "image")
    assert profile["rows"] == 3 and merge([first, second])["rejected"] == 1
    assert profile["labels"] == {"a": 2, "b": 1}
    assert profile["sizes"] == {"28x28": 2, "32x32": 1} and profile["modes"] == {"L": 2, "RGB": 1}
    assert profile["pixel_mean"] == pytest.approx(20.0)
    assert profile["pixel_std"] == pytest.approx(np.sqrt(1700 / 3 - 400))


def _inverted(src: str, dst: Path) -> str:
    """The score split with every image's pixels inverted (255 - x), same files, ids and sizes."""
    dst.mkdir()
    for path in sorted(Path(src).glob("*.parquet")):
        table = pq.read_table(path)
        images = []
        for value in table.column("image").to_pylist():
            pixels = 255 - np.asarray(Image.open(io.BytesIO(value["bytes"])))
            images.append({"bytes": _png(pixels.astype(np.uint8)), "path": value["path"]})
        column = table.schema.get_field_index("image")
        table = table.set_column(column, "image", pa.array(images, table.schema.field("image").type))
        pq.write_table(table, dst / path.name)
    return str(dst)


def test_inverted_score_images_drift_on_the_pixel_mean_alone_and_block_withholds_them(
    ray_cluster, demo_root, tmp_path
):
    """Night 1 profiles every split. Night 2 has the same training data and inverted score images: only the
    score split's pixel mean (and what the model predicts from it) drifts; sizes, modes, the pixel std and
    every training-side feature do not. With drift.action=block its predictions are withheld and the job
    fails; rerun with drift.action=warn, the night is accepted without training or scoring again."""
    image = demo_root["image"]
    train = ("image.train.epochs=2", "image.train.batch_size=32")
    [night1] = run_nightly(config_for(tmp_path, "image", demo_root, *train, "run_date=2026-11-21"))
    assert night1["verdict"]["status"] == "promoted"
    assert set(night1["profile"]) == {"train", "val", "test", "score"}
    assert night1["profile"]["score"]["sizes"] == {"28x28": night1["rows"]["score"]["used"]}
    assert night1["profile"]["train"]["modes"] == {"L": night1["rows"]["train"]["used"]}
    assert sum(night1["profile"]["train"]["labels"].values()) == night1["rows"]["train"]["used"]
    assert night1["drift"]["references"] == {} and night1["drift"]["drifted"] == []

    inverted = _inverted(image["score"], tmp_path / "score-inverted")
    night2_args = (*train, "run_date=2026-11-22", f"image.data.score={inverted}")
    with pytest.raises(QualityError, match="score pixel_mean"):
        run_nightly(config_for(tmp_path, "image", demo_root, *night2_args, "drift.action=block"))
    run_dir = tmp_path / "runs" / "2026-11-22" / "image"
    blocked = json.loads((run_dir / "summary.json").read_text())
    drift = blocked["drift"]
    assert set(drift["references"]) == {"previous", "champion_train"}
    for split in ("train", "val", "test"):  # the same rows as night 1's: no distance to them at all
        assert {f: per["previous"] for f, per in drift["distances"][split].items()} == dict.fromkeys(
            ("labels", "sizes", "modes", "pixel_mean", "pixel_std"), 0.0
        ), split
        assert max(per["champion_train"] for per in drift["distances"][split].values()) <= drift["threshold"]
    score = drift["distances"]["score"]
    assert score["pixel_mean"]["previous"] > 1.0 and score["pixel_mean"]["champion_train"] > 1.0
    for feature in ("sizes", "modes", "pixel_std"):
        assert max(score[feature].values()) <= drift["threshold"], feature
    assert {(d["split"], d["feature"]) for d in drift["drifted"]} <= {
        ("score", "pixel_mean"),
        ("score", "labels"),
    }
    assert (
        blocked["verdict"]["status"] == "drifted" and "predictions withheld" in blocked["verdict"]["reason"]
    )
    assert not (run_dir / "predictions").exists() and not (run_dir / SUCCESS).exists()
    report = (run_dir / "report.html").read_text()
    assert "Input profile and drift" in report and "(drifted)" in report

    [accepted] = run_nightly(config_for(tmp_path, "image", demo_root, *night2_args, "drift.action=warn"))
    assert "train" not in accepted["durations_s"]  # the fit of the blocked attempt is reused
    parts = accepted["metrics"]["score_parts"]
    assert parts["reused"] == parts["parts"]  # and so are its scored parts
    assert accepted["verdict"]["status"] == "drifted" and "drift.action=warn" in accepted["verdict"]["reason"]
    assert (run_dir / "predictions" / SUCCESS).exists() and (run_dir / SUCCESS).exists()
    assert accepted["profile"]["train"] == night1["profile"]["train"]  # kept with the model it trained


def _text_profile(table: pa.Table, tokenizer: str) -> dict:
    spec = {"kind": "text", "feature_column": "text", "id_column": "id", "label_column": "label",
            "label_type": "string", "label_names": [], "num_classes": 0, "tokenizer": tokenizer,
            "max_length": 64}  # fmt: skip
    cols = preprocess_batch(table, spec, with_labels=False)
    return finish(partial(to_arrow(cols), "text", "y", []), "text")


def test_text_in_another_script_drifts_on_unknown_tokens_and_english_does_not():
    """An English-trained tokenizer: another night of English is no drift; a night of Chinese headlines is,
    on the unknown-token share (every character unseen), not on lengths (headlines of a similar number of
    tokens)."""
    english = make_text_table(2000, seed=1, with_labels=False)
    tokenizer = train_tokenizer(iter([english.column("text").to_pylist()]), vocab_size=2000, min_count=2)
    before = _text_profile(make_text_table(1000, seed=2, with_labels=False), tokenizer)
    assert before["unknown"] < 0.05 and before["rows"] == 1000
    again = _text_profile(make_text_table(1000, seed=3, with_labels=False), tokenizer)
    assert (
        compare({"score": again}, {"previous": ("last night", {"score": before})}, "text", 0.2)["drifted"]
        == []
    )
    chinese = _text_profile(make_chinese_text_table(1000, seed=4, with_labels=False), tokenizer)
    found = compare({"score": chinese}, {"previous": ("last night", {"score": before})}, "text", 0.2)
    assert found["distances"]["score"]["unknown"]["previous"] > 0.5
    assert {d["feature"] for d in found["drifted"]} == {"unknown"}
    assert found["distances"]["score"]["lengths"]["previous"] <= 0.2


def test_images_are_profiled_as_decoded_before_conversion():
    """A 32x32 RGB image resized to the configured 28x28 L counts as "32x32" and "RGB" in the profile."""
    rgb = np.full((32, 32, 3), 200, np.uint8)
    grey = np.zeros((28, 28), np.uint8)
    images = [
        {"bytes": _png(rgb), "path": "a.png"},
        {"bytes": _png(grey), "path": "b.png"},
        {"bytes": b"junk", "path": "c.png"},
    ]
    batch = pa.table({"id": [1, 2, 3], "image": images, "label": [0, 1, 1]})
    spec = {"kind": "image", "feature_column": "image", "id_column": "id", "label_column": "label",
            "label_type": "int", "label_names": ["0", "1"], "num_classes": 2, "channels": 1, "height": 28,
            "width": 28, "resize": True}  # fmt: skip
    profile = finish(partial(to_arrow(preprocess_batch(batch, spec)), "image", "y", ["0", "1"]), "image")
    assert profile["rows"] == 2 and profile["labels"] == {"0": 1, "1": 1}  # the undecodable one is a reject
    assert profile["sizes"] == {"28x28": 1, "32x32": 1} and profile["modes"] == {"L": 1, "RGB": 1}
    assert profile["pixel_mean"] == pytest.approx(100, abs=1)  # 200 (converted to L) and 0
    assert profile["pixel_std"] == pytest.approx(100, abs=1)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
