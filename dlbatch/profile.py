"""A night's input profile per split, and its distance to earlier nights (drift).

Preprocessing gives every row a few profile columns (``prof_*``: an image's decoded size and mode before
conversion and its pixel mean and mean square; a text's token count and unknown tokens). The passes that
the job already makes over each split sum them per batch (``partial``); the sums add up (``merge``) and
give the split's profile (``finish``). Distances between two profiles are one number per feature: total
variation for a distribution (0: the same, 1: disjoint), the shift of the pixel mean in the reference's
standard deviations, and the relative change of the standard deviation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PROFILE_COLUMNS = {
    "image": ["prof_size", "prof_mode", "prof_mean", "prof_sq"],
    "text": ["prof_length", "prof_unknown", "prof_cut"],
}
# Token-count bins of the text length distribution: upper bounds; a text longer than max_length counts
# with its first max_length tokens.
LENGTH_BINS = (4, 8, 16, 32, 64, 128, 256, 512)
LENGTH_LABELS = (*(f"<={upper}" for upper in LENGTH_BINS), f">{LENGTH_BINS[-1]}")
FEATURES = {
    "image": ("labels", "sizes", "modes", "pixel_mean", "pixel_std"),
    "text": ("labels", "lengths", "unknown"),
}


def _counts(values: pa.Array) -> dict[str, int]:
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(values).to_pylist()}


def partial(batch: pa.Table, kind: str, label_column: str, label_names: list[str]) -> dict[str, Any]:
    """Sums over one batch's usable rows (no reject reason), to be merged with other batches'."""
    ok = pc.is_null(batch.column("reject_reason"))
    used = batch.filter(ok)
    out: dict[str, Any] = {"rows": used.num_rows, "rejected": batch.num_rows - used.num_rows, "labels": {}}
    labels = used.column(label_column) if label_column in used.column_names else None
    if labels is not None and pa.types.is_string(labels.type):  # predicted labels, by name
        out["labels"] = _counts(labels)
    elif labels is not None:  # label indices into label_names
        idx = labels.to_numpy(zero_copy_only=False).astype(np.int64)
        hist = np.bincount(idx[idx >= 0], minlength=len(label_names))
        out["labels"] = {label_names[i]: int(n) for i, n in enumerate(hist) if n}
    if not set(PROFILE_COLUMNS[kind]) <= set(used.column_names):  # profiling is off for this task
        return out
    if kind == "image":
        out["sizes"] = _counts(used.column("prof_size"))
        out["modes"] = _counts(used.column("prof_mode"))
        out["pixel_sum"] = float(pc.sum(used.column("prof_mean")).as_py() or 0.0)
        out["pixel_sq_sum"] = float(pc.sum(used.column("prof_sq")).as_py() or 0.0)
    else:
        lengths = used.column("prof_length").to_numpy(zero_copy_only=False)
        hist = np.bincount(np.searchsorted(LENGTH_BINS, lengths), minlength=len(LENGTH_LABELS))
        out["lengths"] = {LENGTH_LABELS[i]: int(n) for i, n in enumerate(hist) if n}
        out["tokens"] = int(lengths.sum())
        out["unknown_tokens"] = int(pc.sum(used.column("prof_unknown")).as_py() or 0)
        out["cut"] = int(pc.sum(used.column("prof_cut").cast(pa.int64())).as_py() or 0)
    return out


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for name, n in value.items():
                    into[name] = into.get(name, 0) + n
            else:
                total[key] = total.get(key, 0) + value
    return total


def finish(sums: dict[str, Any], kind: str, labels_from: str = "labels") -> dict[str, Any]:
    """A split's profile from its merged sums."""
    rows = sums.get("rows", 0)
    profile: dict[str, Any] = {"rows": rows, "labels": dict(sorted(sums.get("labels", {}).items()))}
    if labels_from != "labels":
        profile["labels_from"] = labels_from
    if "sizes" not in sums and "lengths" not in sums:  # profiling is off for this task
        return profile
    if kind == "image":
        mean = sums.get("pixel_sum", 0.0) / rows if rows else None
        square = sums.get("pixel_sq_sum", 0.0) / rows if rows else None
        profile["sizes"] = dict(sorted(sums.get("sizes", {}).items()))
        profile["modes"] = dict(sorted(sums.get("modes", {}).items()))
        profile["pixel_mean"] = mean
        profile["pixel_std"] = math.sqrt(max(square - mean * mean, 0.0)) if rows else None
    else:
        tokens = sums.get("tokens", 0)
        lengths = sums.get("lengths", {})
        profile["lengths"] = {label: lengths[label] for label in LENGTH_LABELS if label in lengths}
        profile["mean_length"] = tokens / rows if rows else None
        profile["unknown"] = sums.get("unknown_tokens", 0) / tokens if tokens else None
        profile["cut"] = sums.get("cut", 0) / rows if rows else None  # share cut at max_length
    return profile


def total_variation(a: dict[str, int], b: dict[str, int]) -> float | None:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return None
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def distances(profile: dict[str, Any], reference: dict[str, Any], kind: str) -> dict[str, float]:
    """One distance per feature that both profiles have."""
    out: dict[str, float | None] = {}
    for feature in ("labels", "sizes", "modes", "lengths"):
        if feature in profile and feature in reference:
            out[feature] = total_variation(profile[feature], reference[feature])
    if kind == "image" and None not in (profile.get("pixel_mean"), reference.get("pixel_mean")):
        spread = reference["pixel_std"] or 1.0
        out["pixel_mean"] = abs(profile["pixel_mean"] - reference["pixel_mean"]) / spread
        out["pixel_std"] = abs(profile["pixel_std"] - reference["pixel_std"]) / spread
    if kind == "text" and None not in (profile.get("unknown"), reference.get("unknown")):
        out["unknown"] = abs(profile["unknown"] - reference["unknown"])  # total variation of known/unknown
    return {k: round(v, 4) for k, v in out.items() if v is not None}


def compare(
    night: dict[str, dict[str, Any]],
    references: dict[str, tuple[str, dict[str, Any]]],
    kind: str,
    threshold: float,
) -> dict[str, Any]:
    """Distances of each of tonight's split profiles to each reference, and the ones above ``threshold``.

    ``references``: name -> (what it is, {split: profile}); a reference split "*" stands for every split
    (the champion's training data is compared with each of tonight's splits)."""
    result: dict[str, Any] = {"threshold": threshold, "references": {}, "distances": {}, "drifted": []}
    for name, (what, splits) in references.items():
        result["references"][name] = what
        for split, profile in night.items():
            reference = splits.get(split, splits.get("*"))
            if not reference or not profile.get("rows") or not reference.get("rows"):
                continue
            for feature, distance in distances(profile, reference, kind).items():
                result["distances"].setdefault(split, {}).setdefault(feature, {})[name] = distance
                if distance > threshold:
                    result["drifted"].append(
                        {"split": split, "feature": feature, "against": name, "distance": distance}
                    )
    return result


def describe(drifted: list[dict[str, Any]], references: dict[str, str], threshold: float) -> str:
    """One sentence naming what drifted and by how much against which reference."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for d in drifted:
        grouped.setdefault((d["split"], d["feature"]), []).append(
            f"{d['distance']:.2f} against {references[d['against']]}"
        )
    items = [f"{split} {feature} ({', '.join(against)})" for (split, feature), against in grouped.items()]
    return f"input drift above {threshold:g}: " + "; ".join(items)
