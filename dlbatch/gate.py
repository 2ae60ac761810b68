"""The night's decisions, as pure functions of typed values: the quality floor, drift, the promotion gate,
the verdict and whether the job fails. No Ray, no I/O: tests/test_gate.py runs each branch in milliseconds."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from dlbatch.config import DriftConfig
from dlbatch.profile import compare
from dlbatch.profile import describe as describe_drift
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
    candidate: tuple[str, float],
    rival: tuple[str, float | None] | None,
    tolerance: float,
    blocked: str | None,
) -> Decision:
    """Promotion of ``candidate`` (version, test accuracy) against ``rival`` (the champion's version and
    its accuracy re-measured on tonight's test data). ``blocked``: why the candidate may not be promoted
    at all (the floor, or drift); the rival is then not measured."""
    version, candidate_acc = candidate
    rival_version, rival_acc = rival if rival else (None, None)
    if blocked:
        return Decision(False, rival_version, blocked, candidate_acc, rival_version, rival_acc)
    if rival is None:
        return Decision(True, version, "no champion yet", candidate_acc)
    if candidate_acc >= rival_acc - tolerance:
        reason = (
            f"test accuracy {candidate_acc:.2%} >= champion {rival_version}'s {rival_acc:.2%} "
            f"- tolerance {tolerance:.2%}"
        )
        return Decision(True, version, reason, candidate_acc, rival_version, rival_acc)
    reason = (
        f"kept champion {rival_version}: test accuracy {candidate_acc:.2%} < its {rival_acc:.2%} "
        f"- tolerance {tolerance:.2%} on the same test data"
    )
    return Decision(False, rival_version, reason, candidate_acc, rival_version, rival_acc)


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


def job_failure(summaries: list[dict[str, Any]]) -> str | None:
    """After every task has written its outputs: a model below the floor, or a night that drift blocked,
    fails the job (exit 3). Read from the summaries, so a finished night found again fails again."""
    failed = [
        s for s in summaries
        if s.get("verdict", {}).get("status") == "below_floor" or (s.get("drift") or {}).get("blocked")
    ]  # fmt: skip
    return "; ".join(f"{s['task']}: {s['verdict']['reason']}" for s in failed) or None
