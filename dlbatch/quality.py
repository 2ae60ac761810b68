"""The quality floor: a model must clearly beat the trivial baselines on its own test split.

A model trained on scrambled or shifted labels learns the class prior at best, so it scores about what
"always predict the majority class" scores. The floor asks for more than that: the model must get right at
least ``margin`` of the test rows that the majority baseline gets wrong,

    floor = majority + margin * (1 - majority)

so it scales with the data: 28% for ten balanced classes, 40% for four, 92% where one class is 90% of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def quality_floor(
    confusion: list[list[int]], label_names: list[str], accuracy: float, margin: float
) -> dict[str, Any]:
    """Baselines from the test split's label counts (the confusion matrix's row sums) and the verdict."""
    counts = np.asarray(confusion, dtype=np.int64).sum(axis=1)
    total = int(counts.sum())
    majority = float(counts.max() / total) if total else 0.0
    floor = majority + margin * (1.0 - majority)
    return {
        "majority_class": label_names[int(counts.argmax())] if total else None,
        "majority_accuracy": majority,
        "chance_accuracy": 1.0 / len(counts) if len(counts) else 0.0,
        "margin": margin,
        "floor": floor,
        "test_accuracy": accuracy,
        # A test split with no usable rows cannot show the model is any good.
        "passed": bool(total) and bool(accuracy >= floor),
    }


def describe(quality: dict[str, Any]) -> str:
    return (
        f"test accuracy {quality['test_accuracy']:.2%} is below the quality floor {quality['floor']:.2%} "
        f"(majority class {quality['majority_class']!r} alone scores {quality['majority_accuracy']:.2%}, "
        f"chance {quality['chance_accuracy']:.2%}; quality_margin={quality['margin']:g})"
    )
