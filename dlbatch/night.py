"""The night's state as typed values: what each stage returns, and the one function that turns them into
``summary.json``. The flow (``dlbatch/flow.py``) is the only code that builds a ``Night``."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlbatch.gate import Decision, Drift, Verdict


@dataclass(frozen=True)
class Counts:
    read: int = 0
    used: int = 0
    rejected: int = 0

    def check(self, what: str) -> None:
        # Conservation: every row read is either used or rejected; anything else is a bug, not bad data.
        if self.read != self.used + self.rejected:
            raise RuntimeError(
                f"{what}: {self.read} rows read != {self.used} used + {self.rejected} rejected"
            )


@dataclass(frozen=True)
class SplitCheck:
    """One split after its rows were routed: how many were used and rejected, and its input profile."""

    counts: Counts | None  # None: routed by an earlier attempt, which kept only the profile
    profile: dict[str, Any] | None = None


def rows_line(checks: dict[str, SplitCheck]) -> str:
    """``train 1,500 rows (0 rejected), val 250 rows (0 rejected)``."""
    counted = [(s, c.counts) for s, c in checks.items() if c.counts is not None]
    return ", ".join(f"{s} {c.used:,} rows ({c.rejected:,} rejected)" for s, c in counted)


@dataclass(frozen=True)
class Learned:
    """What a night learned from its training split, saved with every checkpoint of the model."""

    label_type: str
    label_names: list[str]
    model_args: dict[str, Any]
    label_variants: list[list[str]] = field(default_factory=list)
    tokenizer: str | None = None  # text: the tokenizer in its own JSON format
    max_length: int | None = None

    def saved(self) -> dict[str, Any]:
        """As kept in ``learned.json`` and in checkpoints' metadata (the tokenizer goes to its own file)."""
        out = {"label_type": self.label_type, "label_names": self.label_names, "model_args": self.model_args}
        if self.label_type == "string":
            out["label_variants"] = self.label_variants
        if self.tokenizer is not None:
            out["tokenizer"], out["max_length"] = self.tokenizer, self.max_length
        return out

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Learned:
        return cls(
            label_type=saved["label_type"], label_names=list(saved["label_names"]),
            model_args=saved["model_args"], label_variants=saved.get("label_variants", []),
            tokenizer=saved.get("tokenizer"), max_length=saved.get("max_length"),
        )  # fmt: skip


@dataclass(frozen=True)
class Fit:
    """The trained model, published at ``model_uri``, and how its fit went."""

    model_uri: str
    history: list[dict[str, Any]]
    splits: dict[str, SplitCheck]  # train and val; profiles only, when the model was trained earlier
    training_data: dict[str, Any] | None = None  # None: the model was trained by an earlier attempt
    durations_s: dict[str, float] = field(default_factory=dict)
    final_epoch: int | None = None

    @property
    def best_val_accuracy(self) -> float | None:
        return max((h["val_accuracy"] for h in self.history), default=None)


@dataclass(frozen=True)
class Evaluation:
    scores: dict[str, float]  # accuracy, macro_f1, balanced_accuracy (dlbatch/quality.py)
    rows: int
    confusion: list[list[int]]
    label_names: list[str]
    quality: dict[str, Any]  # dlbatch/quality.py: baselines, floor, passed
    test: SplitCheck
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.scores["accuracy"]


@dataclass(frozen=True)
class ScoringModel:
    uri: str
    version: str  # model_version in the predictions: <task>-<date>, or the path asked for


@dataclass(frozen=True)
class Promotion:
    decision: Decision
    deleted_versions: list[str]
    replaced_version: bool
    champion: ScoringModel | None  # the model that scores tonight; None: no champion


@dataclass(frozen=True)
class Scoring:
    """The score split's predictions: published at ``uri``, withheld (``withheld`` says why), or found
    already published by an earlier attempt (``counts`` None)."""

    uri: str | None
    counts: Counts | None = None
    profile: dict[str, Any] | None = None
    parts: dict[str, int] | None = None
    compute: dict[str, Any] | None = None
    withheld: str | None = None
    duplicate_ids: dict[str, Any] | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Night:
    """Everything one task's run decided and measured. Stages fill none of it: the flow builds it."""

    task: str
    run_id: str
    config: dict[str, Any]
    seconds: float
    fit: Fit | None = None
    evaluation: Evaluation | None = None
    learned: Learned | None = None
    drift: Drift | None = None
    pruned_checkpoint_runs: list[str] | None = None
    promotion: Promotion | None = None
    scoring: Scoring | None = None
    verdict: Verdict | None = None
    model_uri: str | None = None  # jobs/predict.py: the model that scored
    data_warnings: list[str] | None = None  # what the input size settings do to the training data


@functools.cache
def versions() -> dict[str, str | None]:
    """Package versions and git commit, once per process (the same for every task of a run)."""
    import importlib.metadata

    import ray
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        version = importlib.metadata.version("dlbatch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"dlbatch": version, "ray": ray.__version__, "torch": torch.__version__, "git_commit": commit}


def _metrics(night: Night) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if night.fit is not None:
        if night.fit.training_data is not None:
            metrics["training_data"] = night.fit.training_data
        metrics["best_val_accuracy"] = night.fit.best_val_accuracy
        metrics["final_epoch"] = night.fit.final_epoch
    if night.pruned_checkpoint_runs is not None:
        metrics["deleted_checkpoint_runs"] = night.pruned_checkpoint_runs
    if night.evaluation is not None:
        ev = night.evaluation
        metrics.update(test_accuracy=ev.accuracy, test_macro_f1=ev.scores["macro_f1"],
                       test_balanced_accuracy=ev.scores["balanced_accuracy"], test_rows=ev.rows,
                       confusion=ev.confusion, label_names=ev.label_names, quality=ev.quality)  # fmt: skip
    if night.learned is not None:
        metrics["label_variants"] = night.learned.label_variants
    if night.promotion is not None:
        p = night.promotion
        metrics["promotion"] = {**p.decision.as_dict(), "deleted_versions": p.deleted_versions,
                                "replaced_version": p.replaced_version}  # fmt: skip
    scoring = night.scoring
    if scoring is not None and scoring.parts is not None:
        metrics["score_parts"] = scoring.parts
        metrics["predict"] = scoring.compute
        if scoring.withheld:
            metrics["predictions_withheld"] = scoring.withheld
        if scoring.duplicate_ids is not None:
            metrics["duplicate_ids"] = scoring.duplicate_ids
    return metrics


def _splits(night: Night) -> dict[str, SplitCheck]:
    splits: dict[str, SplitCheck] = dict(night.fit.splits) if night.fit else {}
    if night.evaluation is not None:
        splits["test"] = night.evaluation.test
    scoring = night.scoring
    if scoring is not None and (scoring.counts is not None or scoring.profile is not None):
        splits["score"] = SplitCheck(scoring.counts, scoring.profile)
    return splits


def _durations(night: Night) -> dict[str, float]:
    durations = dict(night.fit.durations_s) if night.fit else {}
    if night.evaluation is not None:
        durations["evaluate"] = night.evaluation.seconds
    if night.scoring is not None and night.scoring.seconds is not None:
        durations["predict"] = night.scoring.seconds
    return {**durations, "total": night.seconds}


def _paths(night: Night, summary_uri: str | None, report_uri: str | None) -> dict[str, str]:
    paths: dict[str, str] = {}
    if night.fit is not None:
        paths["model"] = night.fit.model_uri
    if night.promotion is not None and night.promotion.champion:
        paths["champion"] = night.promotion.champion.uri
    if night.scoring is not None and night.scoring.uri:
        paths["predictions"] = night.scoring.uri
    if night.model_uri is not None:
        paths["model"] = night.model_uri
    if summary_uri:
        paths["summary"], paths["report"] = summary_uri, report_uri
    return paths


def build_summary(night: Night, summary_uri: str | None = None, report_uri: str | None = None) -> dict:
    """``summary.json``: the one place its shape is decided (tests/test_night.py pins its keys)."""
    splits = _splits(night)
    summary: dict[str, Any] = {"verdict": asdict(night.verdict)} if night.verdict else {}
    summary.update({
        "task": night.task,
        "run_id": night.run_id,
        "versions": dict(versions()),
        "config": night.config,
        "test_accuracy": night.evaluation.accuracy if night.evaluation else None,
        "metrics": _metrics(night),
        "history": night.fit.history if night.fit else [],
        "rows": {s: asdict(c.counts) for s, c in splits.items() if c.counts is not None},
        "profile": {s: c.profile for s, c in splits.items() if c.profile is not None},
        "drift": asdict(night.drift) if night.drift else None,
        "data_warnings": night.data_warnings if night.data_warnings is not None else [],
        "paths": _paths(night, summary_uri, report_uri),
        "durations_s": _durations(night),
    })  # fmt: skip
    return summary
