"""The night's decisions, as pure functions of typed values: the quality floor, drift, the promotion gate,
the verdict and whether the job fails. No Ray, no I/O: tests/test_gate.py runs each branch in milliseconds."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dlbatch.config import DriftConfig, JobConfig
from dlbatch.profile import compare
from dlbatch.profile import describe as describe_drift
from dlbatch.quality import NAMES
from dlbatch.quality import describe as describe_quality

log = logging.getLogger("dlbatch")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    champion_version: str | None  # None: no champion (nothing to score with)
    reason: str
    candidate_accuracy: float
    previous_version: str | None = None
    previous_accuracy_same_test: float | None = None
    metric: str = "accuracy"  # gate_metric: what candidate_accuracy and previous_accuracy_same_test measure

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Drift:
    """Tonight's profiles against the references (dlbatch/profile.py ``compare``)."""

    threshold: float
    action: str
    references: dict[str, str]
    reference_profiles: dict[str, dict[str, Any]]
    distances: dict[str, dict[str, dict[str, float]]]
    drifted: list[dict[str, Any]]
    blocked: bool = False

    def plus(self, later: Drift | None) -> Drift:
        """This check and a later one of other splits (the score split's, once it is scored)."""
        if later is None:
            return self
        return Drift(
            self.threshold, self.action, self.references, self.reference_profiles,
            {**self.distances, **later.distances}, [*self.drifted, *later.drifted],
            self.blocked or later.blocked,
        )  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    status: str  # promoted, kept_champion, below_floor, drifted, trained
    reason: str


@dataclass(frozen=True)
class Blocks:
    """Why tonight's model may not be promoted, whatever its accuracy."""

    floor: str | None = None  # below the quality floor
    drift: str | None = None  # its training, validation or test data drifted, with drift.action=block

    @property
    def reason(self) -> str | None:
        return self.floor or self.drift


def floor_failure(quality: dict[str, Any]) -> str | None:
    """Why the model is below the quality floor (dlbatch/quality.py), or None when it passed."""
    return None if quality["passed"] else describe_quality(quality)


def check_drift(
    profiles: dict[str, dict[str, Any] | None], references: dict, kind: str, settings: DriftConfig
) -> Drift:
    """Tonight's ``profiles`` (split -> profile) against the references; a warning line for what drifted.
    Blocked when something drifted and ``drift.action=block``."""
    night = {split: profile for split, profile in profiles.items() if profile}
    found = compare(night, references, kind, settings.threshold)
    blocked = bool(found["drifted"]) and settings.action == "block"
    if found["drifted"]:
        log.warning("%s: %s", kind, describe_drift(found["drifted"], found["references"], settings.threshold))
    return Drift(
        threshold=settings.threshold, action=settings.action, references=found["references"],
        reference_profiles={name: splits for name, (_, splits) in references.items()},
        distances=found["distances"], drifted=found["drifted"], blocked=blocked,
    )  # fmt: skip


def drift_block(drift: Drift | None) -> str | None:
    """Why this drift check blocks what it guards (promotion, or publishing predictions), or None."""
    if drift is None or not drift.blocked:
        return None
    return f"{describe_drift(drift.drifted, drift.references, drift.threshold)} (drift.action=block)"


def decide_promotion(
    candidate: tuple[str, float], rival: tuple[str, float | None] | None, job: JobConfig, blocked: str | None
) -> Decision:
    """Promotion of ``candidate`` (version, its ``gate_metric`` on the test split) against ``rival`` (the
    champion's version and its value re-measured on tonight's test data), within ``promotion_tolerance``.
    ``blocked``: why the candidate may not be promoted at all (the floor, or drift); the rival is then not
    measured."""
    version, value = candidate
    rival_version, rival_value = rival if rival else (None, None)
    metric, tolerance = job.gate_metric, job.promotion_tolerance
    if blocked:
        return Decision(False, rival_version, blocked, value, rival_version, rival_value, metric)
    if rival is None:
        return Decision(True, version, "no champion yet", value, metric=metric)
    name = NAMES[metric]
    if value >= rival_value - tolerance:
        reason = f"test {name} {value:.2%} >= champion {rival_version}'s {rival_value:.2%} - tolerance {tolerance:.2%}"
        return Decision(True, version, reason, value, rival_version, rival_value, metric)
    reason = (
        f"kept champion {rival_version}: test {name} {value:.2%} < its {rival_value:.2%} "
        f"- tolerance {tolerance:.2%} on the same test data"
    )
    return Decision(False, rival_version, reason, value, rival_version, rival_value, metric)


def nightly_verdict(blocks: Blocks, drift: Drift | None, decision: Decision, withheld: str | None) -> Verdict:
    """The night in one status and one sentence: what happened to the model and to the predictions."""
    if withheld:
        then = "predictions withheld"
    elif decision.champion_version:
        then = f"scored with champion {decision.champion_version}"
    else:
        then = "no predictions published (no champion yet)"
    if blocks.floor:
        return Verdict("below_floor", f"{blocks.floor}; not promoted, {then}")
    if drift is not None and drift.drifted:
        what = describe_drift(drift.drifted, drift.references, drift.threshold)
        if blocks.drift:
            model = "not promoted"
        elif decision.promoted:
            model = "promoted"
        else:
            model = f"not promoted ({decision.reason})"
        how = "drift.action=block" if drift.blocked else "drift.action=warn: nothing withheld"
        return Verdict("drifted", f"{what}; {model}, {then} ({how})")
    if decision.promoted:
        return Verdict("promoted", f"promoted: {decision.reason}")
    return Verdict("kept_champion", decision.reason)


def train_verdict(floor: str | None, drift: Drift | None, accuracy: float) -> Verdict:
    """jobs/train.py's verdict: it promotes and scores nothing, so drift is reported, never blocking."""
    if floor:
        return Verdict("below_floor", floor)
    if drift is not None and drift.drifted:
        what = describe_drift(drift.drifted, drift.references, drift.threshold)
        return Verdict("drifted", f"{what}; not promoted by this job (jobs/nightly.py promotes)")
    return Verdict(
        "trained", f"test accuracy {accuracy:.2%}; not promoted by this job (jobs/nightly.py promotes)"
    )


# PIL modes without colour; every other decoded mode (RGB, RGBA, CMYK, P, ...) carries it.
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F", "pixels"}


def _median_size(sizes: dict[str, int]) -> tuple[int, int]:
    """The median decoded height and width of ``{"HxW": rows}``."""
    shapes = np.array([[int(n) for n in size.split("x")] for size in sizes], dtype=np.int64)
    rows = np.repeat(np.arange(len(shapes)), list(sizes.values()))
    h, w = np.median(shapes[rows], axis=0)
    return int(h), int(w)


def data_warnings(task_cfg, profile: dict[str, Any] | None) -> list[str]:
    """What the configured input size does to the training data, from its profile: images resized by
    more than 2x or losing their colour, or more than half of the texts cut at ``max_length``."""
    if not profile or not profile.get("rows"):
        return []
    found = []
    if hasattr(task_cfg, "image"):
        img = task_cfg.image
        sizes = {s: n for s, n in (profile.get("sizes") or {}).items() if "x" in s}
        if sizes:
            h, w = _median_size(sizes)
            factor = max(h / img.height, img.height / h, w / img.width, img.width / w)
            if factor > 2:
                found.append(
                    f"image: training images are {h}x{w} (median) and are resized {factor:.1f}x to "
                    f"{img.height}x{img.width}; set image.image.height and image.image.width to keep their detail"
                )
        colour = sum(n for mode, n in (profile.get("modes") or {}).items() if mode not in GREY_MODES)
        if img.channels == 1 and colour > profile["rows"] / 2:
            found.append(
                f"image: {colour / profile['rows']:.0%} of training images are in colour and are converted to "
                "grey (image.image.channels=1); set image.image.channels=3 to keep their colour"
            )
    elif (profile.get("cut") or 0) > 0.5:
        found.append(
            f"text: {profile['cut']:.0%} of training texts are longer than {task_cfg.text.max_length} tokens "
            f"and are cut there; raise text.text.max_length to keep more of them"
        )
    return found


def job_failure(summaries: list[dict[str, Any]]) -> str | None:
    """After every task has written its outputs: a model below the floor, or a night that drift blocked,
    fails the job (exit 3). Read from the summaries, so a finished night found again fails again."""
    failed = [
        s for s in summaries
        if s.get("verdict", {}).get("status") == "below_floor" or (s.get("drift") or {}).get("blocked")
    ]  # fmt: skip
    return "; ".join(f"{s['task']}: {s['verdict']['reason']}" for s in failed) or None
