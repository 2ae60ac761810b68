"""Cost of rejecting rows: preprocessing throughput on clean data vs. the same data with bad rows.

    python bench/rejects.py            # prints rows/s for clean and dirty batches and their ratio

Measured on the preprocessing function that Ray Data runs in ``map_batches`` (the only code that differs
between clean and dirty data; the Ray Data plumbing around it is the same for both).
"""

from __future__ import annotations

import json
import statistics
import time

import pyarrow as pa

from dlbatch.demo import make_image_table, make_text_table
from dlbatch.preprocess import preprocess_batch
from dlbatch.tokenizer import train_tokenizer

TEXT_SPEC = {"kind": "text", "feature_column": "text", "id_column": "id", "label_column": "label",
             "label_type": "string", "num_classes": 4, "max_length": 64}  # fmt: skip
IMAGE_SPEC = {"kind": "image", "feature_column": "image", "id_column": "id", "label_column": "label",
              "label_type": "int", "num_classes": 10, "channels": 1, "height": 28, "width": 28, "resize": True}  # fmt: skip


def dirty(table: pa.Table, column: str, bad_value, every: int) -> pa.Table:
    values = table[column].to_pylist()
    for i in range(0, len(values), every):
        values[i] = bad_value
    return table.set_column(
        table.schema.get_field_index(column), column, pa.array(values, table[column].type)
    )


def rows_per_s(table: pa.Table, spec: dict, batch: int = 1024, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, table.num_rows, batch):
            preprocess_batch(table.slice(start, batch), spec)
        times.append(time.perf_counter() - t0)
    return table.num_rows / statistics.median(times)


def main() -> dict:
    text = make_text_table(20_000, seed=1)
    labels = sorted(set(text["label"].to_pylist()))
    tokenizer = train_tokenizer(iter([text["text"].to_pylist()]), vocab_size=10_000, min_count=1)
    text_spec = {**TEXT_SPEC, "label_names": labels, "tokenizer": tokenizer}
    image = make_image_table(5_000, seed=2)
    image_spec = {**IMAGE_SPEC, "label_names": [str(i) for i in range(10)]}
    cases = {
        "text": (text, text_spec, dirty(text, "text", None, 20)),
        "image": (image, image_spec, dirty(image, "image", {"bytes": b"junk", "path": "x"}, 20)),
    }
    report = {}
    for name, (clean, spec, bad) in cases.items():
        clean_rate, dirty_rate = rows_per_s(clean, spec), rows_per_s(bad, spec)
        report[name] = {
            "clean_rows_per_s": clean_rate,
            "dirty_rows_per_s": dirty_rate,
            "ratio": dirty_rate / clean_rate,
        }
        print(
            f"{name}: clean {clean_rate:,.0f} rows/s, 5% rejected {dirty_rate:,.0f} rows/s, ratio {dirty_rate / clean_rate:.3f}"
        )
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
