"""Vectorized batch preprocessing shared by training, evaluation and inference.

``preprocess_batch`` takes a raw Arrow batch (as read from Parquet) and a plain-dict ``spec`` and returns
model-ready columns plus a ``reject_reason`` per row. Bad rows are never dropped here: they keep their
place with zeroed features and a reason, so callers can count and route them.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from dlbatch.tokenizer import UNK, encode_counted

try:  # libspng: PNG decoding without Pillow's per-image Python overhead (see _decode_png_fast)
    import pyspng
except ImportError:  # pragma: no cover - platforms without a wheel decode with Pillow
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Columns added by the reader (``include_paths`` / ``include_row_hash``).
PATH_COL, ROW_HASH_COL = "path", "row_hash"


def _image_bytes_column(col: pa.Array) -> pa.Array:
    if pa.types.is_struct(col.type):
        return pc.struct_field(col, "bytes")
    return col


def _decode_png_fast(data: bytes, mode: str, height: int, width: int) -> np.ndarray | None:
    """HWC/HW uint8 pixels of an 8-bit PNG already in ``mode`` and size, decoded by libspng; None for
    anything else (other formats, sizes, bit depths, alpha, palettes to grey, corrupt files): those go
    through Pillow, which converts them and names what is wrong. Where this returns pixels they are
    identical to Pillow's (tests/test_preprocess.py compares both paths)."""
    if pyspng is None or not data.startswith(PNG_SIGNATURE):
        return None
    try:
        arr = pyspng.load(data)
    except Exception:  # libspng's errors are plain RuntimeErrors; Pillow re-decodes and reports
        return None
    expected = (height, width) if mode == "L" else (height, width, 3)
    return arr if arr.dtype == np.uint8 and arr.shape == expected else None


def _decode_one(
    data: bytes, mode: str, height: int, width: int, resize: bool
) -> tuple[np.ndarray | None, str | None, str, str]:
    """(CHW pixels, reject reason, the decoded size "HxW" and mode before any conversion)."""
    arr = _decode_png_fast(data, mode, height, width)
    size, decoded_mode = f"{height}x{width}", mode
    if arr is None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                size, decoded_mode = f"{img.size[1]}x{img.size[0]}", img.mode
                if img.size != (width, height):
                    if not resize:
                        reason = (
                            f"image is {img.size[1]}x{img.size[0]}, expected {height}x{width} (resize is off)"
                        )
                        return None, reason, size, decoded_mode
                    img = img.convert(mode).resize((width, height), Image.BILINEAR)
                if img.mode != mode:
                    img = img.convert(mode)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            return None, f"undecodable image ({type(err).__name__})", size, decoded_mode
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), None, size, decoded_mode


def _decode_images(
    col: pa.Array, spec: dict[str, Any], reasons: list[str | None]
) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """(pixels, each row's decoded size and mode before conversion; pixel arrays: the configured size and
    mode "pixels")."""
    c, h, w = spec["channels"], spec["height"], spec["width"]
    out = np.zeros((len(col), c, h, w), dtype=np.uint8)
    if (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
    ):
        lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
        valid = np.asarray(col.is_valid())
        good = valid & (lengths == c * h * w)
        if good.any():
            pixels = pc.filter(col, pa.array(good)).flatten().to_numpy(zero_copy_only=False)
            out[good] = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, c, h, w)
        for i in np.flatnonzero(~good):
            if reasons[i] is None:
                reasons[i] = (
                    "null image"
                    if not valid[i]
                    else f"pixel array has {lengths[i]} values, expected {c * h * w}"
                )
        return out, [f"{h}x{w}"] * len(col), ["pixels"] * len(col)
    mode = "L" if c == 1 else "RGB"
    data = _image_bytes_column(col)
    sizes: list[str | None] = [None] * len(col)
    modes: list[str | None] = [None] * len(col)
    for i, value in enumerate(data.to_pylist()):
        if value is None:
            reasons[i] = reasons[i] or "null image"
            continue
        arr, reason, sizes[i], modes[i] = _decode_one(value, mode, h, w, spec["resize"])
        if reason:
            reasons[i] = reasons[i] or reason
        else:
            out[i] = arr
    return out, sizes, modes


def _labels(col: pa.Array | None, spec: dict[str, Any], reasons: list[str | None]) -> np.ndarray:
    """Label indices, -1 where there is no usable label (the reason is recorded)."""
    if col is None:
        return np.full(len(reasons), -1, dtype=np.int64)
    valid = np.asarray(col.is_valid())
    if spec["label_type"] == "string":
        idx = pc.index_in(col.cast(pa.string()), value_set=pa.array(spec["label_names"], pa.string()))
        y = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        known = y >= 0
    else:
        values = pc.fill_null(col, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        known = (values >= 0) & (values < spec["num_classes"])
        y = np.where(known, values, -1)
    for i in np.flatnonzero(~(valid & known)):
        if reasons[i] is None:
            reasons[i] = "null label" if not valid[i] else f"unknown label {col[i].as_py()!r}"
    return y


def row_ids(batch: pa.Table, spec: dict[str, Any]) -> pa.Array:
    """The row's identity: the configured id column, or the reader's stable hash of (file, row position)."""
    if spec["id_column"] in batch.column_names:
        return batch.column(spec["id_column"]).combine_chunks()
    return batch.column(ROW_HASH_COL).combine_chunks()


def preprocess_batch(batch: pa.Table, spec: dict[str, Any], with_labels: bool = True) -> dict[str, Any]:
    """Raw Arrow batch -> model-ready numpy columns plus ``id``, ``source`` and ``reject_reason``."""
    n = batch.num_rows
    reasons: list[str | None] = [None] * n
    ids = row_ids(batch, spec)
    for i in np.flatnonzero(~np.asarray(ids.is_valid())):
        reasons[i] = "null id"
    out: dict[str, Any] = {}
    if spec["kind"] == "image":
        pixels, sizes, modes = _decode_images(
            batch.column(spec["feature_column"]).combine_chunks(), spec, reasons
        )
        out["x"] = pixels  # uint8: a quarter of float32 through Ray Data; the CNN scales on its device
        if spec.get("profile", True):  # the input profile (dlbatch/profile.py), for drift between nights
            flat = pixels.reshape(n, -1)
            out["prof_size"], out["prof_mode"] = pa.array(sizes, pa.string()), pa.array(modes, pa.string())
            out["prof_mean"] = flat.mean(1, dtype=np.float64)
            out["prof_sq"] = np.square(flat, dtype=np.uint16).mean(1, dtype=np.float64)
    else:
        texts = batch.column(spec["feature_column"]).combine_chunks()
        tokens, lengths, cut = encode_counted(texts, spec["tokenizer"], spec["max_length"])
        # Empty: no letter or digit in any script (whitespace, punctuation, emoji or control characters only).
        has_content = pc.fill_null(pc.match_substring_regex(texts, r"[\p{L}\p{N}]"), False)
        valid, empty = np.asarray(texts.is_valid()), ~np.asarray(has_content) | (lengths == 0)
        for i in np.flatnonzero(~valid | empty):
            reasons[i] = reasons[i] or ("null text" if not valid[i] else "empty text")
        out["tokens"], out["length"] = tokens, np.maximum(lengths, 1)
        if spec.get("profile", True):
            out["prof_length"], out["prof_unknown"] = lengths, (tokens == UNK).sum(1)
            out["prof_cut"] = cut
    label_col = spec["label_column"]
    has_labels = with_labels and label_col in batch.column_names
    out["y"] = _labels(batch.column(label_col).combine_chunks() if has_labels else None, spec, reasons)
    out["id"] = ids
    out["source"] = (
        batch.column(PATH_COL).combine_chunks()
        if PATH_COL in batch.column_names
        else pa.nulls(n, pa.string())
    )
    out["reject_reason"] = pa.array(reasons, pa.string())
    return out


def preprocess_for_training(batch: pa.Table, spec: dict[str, Any]) -> pa.Table:
    """``map_batches`` entry point: every row kept (features + reason), so rejects can be routed after."""
    cols = preprocess_batch(batch, spec)
    return to_arrow(cols)


def to_arrow(cols: dict[str, Any]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    arrays = {}
    for name, value in cols.items():
        if isinstance(value, np.ndarray) and value.ndim > 1:
            arrays[name] = ArrowTensorArray.from_numpy(value)
        elif isinstance(value, np.ndarray):
            arrays[name] = pa.array(value)
        else:
            arrays[name] = value
    return pa.table(arrays)
