"""Text in a script written without spaces: the trained subword tokenizer must learn it, where splitting on
spaces and punctuation turned each headline into one unseen "word"."""

from __future__ import annotations

import math
import re
from collections import Counter

import pyarrow.parquet as pq

from dlbatch.config import load_config
from dlbatch.demo import make_chinese_text_table
from dlbatch.flow import run_train


def naive_bayes_accuracy(train, test, features) -> float:
    """Test accuracy of a multinomial naive Bayes (add-one smoothing) over ``features(text)``."""
    counts: dict[str, Counter] = {}
    priors = Counter(train["label"])
    for text, label in zip(train["text"], train["label"], strict=True):
        counts.setdefault(label, Counter()).update(features(text))
    vocab = set().union(*counts.values())
    totals = {label: sum(c.values()) for label, c in counts.items()}

    def predict(text: str) -> str:
        def score(label: str) -> float:
            c, total = counts[label], totals[label] + len(vocab)
            return math.log(priors[label]) + sum(math.log((c[f] + 1) / total) for f in features(text))

        return max(counts, key=score)

    hits = [predict(t) == y for t, y in zip(test["text"], test["label"], strict=True)]
    return sum(hits) / len(hits)


def test_the_text_task_learns_chinese_headlines_close_to_a_character_level_baseline(ray_cluster, tmp_path):
    splits = {}
    for name, (rows, seed) in {"train": (3000, 1), "val": (600, 2), "test": (600, 3)}.items():
        (tmp_path / name).mkdir()
        table = make_chinese_text_table(rows, seed=seed, start=seed * 10**6)
        pq.write_table(table, tmp_path / name / "part-0.parquet")
        splits[name] = table.to_pydict()
    # What splitting on anything but letters, digits and apostrophes (the old tokenizer) saw: phrases.
    phrases = naive_bayes_accuracy(splits["train"], splits["test"], lambda t: re.split(r"[^\w']+", t.lower()))
    characters = naive_bayes_accuracy(splits["train"], splits["test"], lambda t: list(t.replace("，", "")))

    cfg = load_config(None, [
        "tasks=[text]", f"output_root={tmp_path / 'out'}", "run_date=2026-11-25", "text.train.epochs=3",
        *[f"text.data.{s}={tmp_path / s}" for s in ("train", "val", "test")],
    ])  # fmt: skip
    [summary] = run_train(cfg)

    accuracy = summary["test_accuracy"]
    assert characters > 0.8 and phrases < 0.5, (phrases, characters)  # the data is what the test says
    assert accuracy >= characters - 0.05, (accuracy, phrases, characters)
    assert accuracy > phrases + 0.3, (accuracy, phrases, characters)
    assert sorted(summary["metrics"]["label_names"]) == sorted(set(splits["train"]["label"]))
