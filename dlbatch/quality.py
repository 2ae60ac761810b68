"""Test metrics from a confusion matrix, and the quality floor: a model must clearly beat the trivial
baseline on its own test split.

A model trained on scrambled or shifted labels learns the class prior at best, so it scores about what
"always predict the majority class" scores. The floor asks for more than that: the model must close at
least ``margin`` of the gap between that baseline and a perfect score, on the gate's metric,

    floor = baseline + margin * (1 - baseline)

so it scales with the data. For accuracy the baseline is the majority class's share: 28% for ten
balanced classes, 40% for four, 92% where one class is 90% of rows. For balanced accuracy it is 1/K, and
for macro-F1 the majority class's F1 over K classes: metrics that a skewed split cannot flatter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}


def per_class_scores(confusion: list[list[int]] | np.ndarray) -> list[dict[str, float]]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true, cols: predicted)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return [
        {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s), "predicted": int(n)}
        for p, r, f, s, n in zip(precision, recall, f1, actual, predicted, strict=True)
    ]


def scores(confusion: list[list[int]] | np.ndarray) -> dict[str, float]:
    """Accuracy; macro-F1, the mean F1 over the classes that occur in the labels or the predictions;
    balanced accuracy, the mean recall over the classes that occur in the labels (rows: true labels)."""
    cm = np.asarray(confusion, dtype=np.float64)
    if not cm.sum():
        return dict.fromkeys(METRICS, float("nan"))
    per_class = per_class_scores(cm)
    return {
        "accuracy": float(np.trace(cm) / cm.sum()),
        "macro_f1": float(np.mean([c["f1"] for c in per_class if c["support"] or c["predicted"]])),
        "balanced_accuracy": float(np.mean([c["recall"] for c in per_class if c["support"]])),
    }


def majority_scores(confusion: list[list[int]] | np.ndarray) -> dict[str, float]:
    """What "always predict the majority class" scores on the same rows, on every metric."""
    actual = np.asarray(confusion, dtype=np.int64).sum(axis=1)
    constant = np.zeros((len(actual), len(actual)), dtype=np.int64)
    constant[:, int(actual.argmax())] = actual
    return scores(constant)


def quality_floor(
    confusion: list[list[int]], label_names: list[str], margin: float, metric: str = "accuracy"
) -> dict[str, Any]:
    """Baselines from the test split's label counts (the confusion matrix's row sums), the floor on the
    gate's ``metric``, and the verdict."""
    counts = np.asarray(confusion, dtype=np.int64).sum(axis=1)
    total = int(counts.sum())
    model = scores(confusion)
    baseline = majority_scores(confusion)[metric] if total else 0.0
    floor = baseline + margin * (1.0 - baseline)
    return {
        "majority_class": label_names[int(counts.argmax())] if total else None,
        "majority_accuracy": float(counts.max() / total) if total else 0.0,
        "chance_accuracy": 1.0 / len(counts) if len(counts) else 0.0,
        "margin": margin,
        "metric": metric,
        "baseline": baseline,
        "floor": floor,
        "test_accuracy": model["accuracy"],
        "test_value": model[metric],
        # A test split with no usable rows cannot show the model is any good.
        "passed": bool(total) and bool(model[metric] >= floor),
    }


def describe(quality: dict[str, Any]) -> str:
    metric = quality.get("metric", "accuracy")
    if metric == "accuracy":
        return (
            f"test accuracy {quality['test_accuracy']:.2%} is below the quality floor {quality['floor']:.2%} "
            f"(majority class {quality['majority_class']!r} alone scores {quality['majority_accuracy']:.2%}, "
            f"chance {quality['chance_accuracy']:.2%}; quality_margin={quality['margin']:g})"
        )
    name = NAMES[metric]
    return (
        f"test {name} {quality['test_value']:.2%} is below the quality floor {quality['floor']:.2%} "
        f"(majority class {quality['majority_class']!r} alone scores {name} {quality['baseline']:.2%}; "
        f"gate_metric={metric}, quality_margin={quality['margin']:g})"
    )
