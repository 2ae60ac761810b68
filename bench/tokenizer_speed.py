"""Tokenizing throughput: the subword tokenizer (dlbatch.tokenizer) against the regex split it replaced, on
the same rows, in one run. Encoding is timed per batch of 1,024 rows as ``map_batches`` calls it, to padded
(B, max_length) int64 ids plus lengths. Three corpora: the English and Chinese demo text, and a
large-vocabulary one (Zipf over 300,000 made-up words, ~100,000 of them seen), where the encoder's
per-process memo of chunks misses most. Reported: the first pass with an empty memo (cold, what one Ray
Data task starting on a split pays) and the median of 5 further passes (warm), against the regex median.

    cd bench && python tokenizer_speed.py      # writes bench/tokenizer_speed.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlbatch import tokenizer as tok
from dlbatch.demo import make_chinese_text_table, make_text_table

HERE = Path(__file__).parent
MAX_LENGTH, BATCH, VOCAB = 64, 1024, 10_000
# The replaced tokenizer: anything but letters, digits and apostrophes separates tokens (RE2 syntax).
REGEX_SPLIT = r"[^\p{L}\p{N}']+"


def regex_tokens(texts: pa.Array) -> pa.ListArray:
    parts = pc.split_pattern_regex(pc.utf8_lower(texts), REGEX_SPLIT)
    flat = parts.flatten()
    keep = pc.not_equal(flat, "")
    rows = pc.filter(pc.list_parent_indices(parts), keep).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(parts)))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.filter(flat, keep))


def regex_encode(texts: pa.Array, vocab: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The replaced encoder: word ids by vocabulary lookup (0 pad, 1 unknown), truncated and padded."""
    lists = regex_tokens(texts)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    flat = lists.flatten()
    ids = pc.fill_null(pc.add(pc.index_in(flat, value_set=vocab), 2), 1).to_numpy(zero_copy_only=False)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(flat)) - starts[rows]
    keep = pos < MAX_LENGTH
    tokens = np.zeros((len(lists), MAX_LENGTH), dtype=np.int64)
    tokens[rows[keep], pos[keep]] = ids[keep]
    return tokens, np.minimum(lengths, MAX_LENGTH)


def rows_per_s(texts: pa.Array, fn, passes: int = 5) -> float:
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for start in range(0, len(texts), BATCH):
            fn(texts.slice(start, BATCH))
        times.append(time.perf_counter() - t0)
    return len(texts) / statistics.median(times)


def large_vocabulary_texts(rows: int, seed: int = 0) -> pa.Array:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(2, 12))) for _ in range(300_000)])
    p = 1 / np.arange(1, len(words) + 1) ** 1.05
    picks = rng.choice(len(words), size=(rows, 30), p=p / p.sum())
    lengths = rng.integers(8, 30, size=rows)
    return pa.array([" ".join(words[picks[i, : lengths[i]]]) + "." for i in range(rows)])


def bench(texts: pa.Array) -> dict:
    t0 = time.perf_counter()
    counts = pc.value_counts(regex_tokens(texts).flatten())
    order = pc.sort_indices(pa.table({"n": counts.field("counts")}), [("n", "descending")])
    vocab = pc.take(counts.field("values"), order).slice(0, VOCAB - 2)
    regex_fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = tok.train_tokenizer(
        (texts.slice(i, 4096).to_pylist() for i in range(0, len(texts), 4096)), VOCAB, 1
    )
    subword_fit_s = time.perf_counter() - t0
    old = rows_per_s(texts, lambda b: regex_encode(b, vocab))
    tok._encoder.cache_clear()
    cold = rows_per_s(texts, lambda b: tok.encode(b, tokenizer, MAX_LENGTH), passes=1)
    new = rows_per_s(texts, lambda b: tok.encode(b, tokenizer, MAX_LENGTH))
    return {
        "rows": len(texts),
        "regex_rows_per_s": old,
        "subword_cold_rows_per_s": cold,
        "subword_rows_per_s": new,
        "subword_cold_vs_regex": cold / old,
        "subword_vs_regex": new / old,
        "regex_vocabulary_s": regex_fit_s,
        "subword_training_s": subword_fit_s,
    }


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows per language")
    parser.add_argument("--out", default=str(HERE / "tokenizer_speed.json"))
    args = parser.parse_args()
    results = {
        "english": bench(make_text_table(args.rows, seed=1)["text"].combine_chunks()),
        "chinese": bench(make_chinese_text_table(args.rows, seed=1)["text"].combine_chunks()),
        "large_vocabulary": bench(large_vocabulary_texts(args.rows)),
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'text':16} {'regex rows/s':>13} {'subword cold':>13} {'warm':>9} {'ratio cold / warm':>18} "
          f"{'fit s (regex / subword)':>24}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:16} {r['regex_rows_per_s']:13,.0f} {r['subword_cold_rows_per_s']:13,.0f} "
              f"{r['subword_rows_per_s']:9,.0f} {r['subword_cold_vs_regex']:11.2f} / {r['subword_vs_regex']:.2f} "
              f"{r['regex_vocabulary_s']:11.2f} / {r['subword_training_s']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
