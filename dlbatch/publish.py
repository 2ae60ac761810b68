"""The night's outputs beyond its model and predictions: the model store's promotion, the references that
drift is measured against, ``summary.json`` and ``report.html``, and the run's finished marker."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from dlbatch.context import RunContext
from dlbatch.data import resolve_path
from dlbatch.errors import DlbatchError
from dlbatch.gate import Decision
from dlbatch.night import Promotion, ScoringModel
from dlbatch.registry import ModelStore
from dlbatch.report import render_report
from dlbatch.store import RunPaths, is_published, mark_published, read_json, remove_if_exists, write_json

log = logging.getLogger("dlbatch")


def forget_run(ctx: RunContext) -> None:
    """``force``: delete this run date's outputs and Ray Train checkpoints so everything is redone."""
    paths = ctx.paths
    fs, root = resolve_path(paths.storage_path)
    remove_if_exists(fs, f"{root}/{paths.run_id}")
    remove_if_exists(paths.fs, paths.path())


def finished_night(ctx: RunContext) -> dict[str, Any] | None:
    """The summary of this date's nightly run when it already finished (a retried trigger), else None."""
    paths = ctx.paths
    if ctx.mode != "nightly" or ctx.job.force or not is_published(paths.fs, paths.path()):
        return None
    log.info("%s: run %s already finished; not redone (force=true to redo)", ctx.task, paths.run_id)
    return {**read_json(paths.fs, paths.path("summary.json")), "skipped": True}


def mark_finished(ctx: RunContext) -> None:
    """The whole nightly run is done: a retried trigger finds this and does nothing."""
    mark_published(ctx.paths.fs, ctx.paths.path(), {"run_id": ctx.run_id})


def previous_summary(paths: RunPaths, finished_only: bool = False) -> dict[str, Any] | None:
    """The latest earlier run date's summary for this task, for night-over-night comparison;
    ``finished_only``: of a nightly run that finished (not one that drift blocked or that was killed)."""
    entries = paths.fs.get_file_info(pafs.FileSelector(f"{paths.root}/runs", allow_not_found=True))
    dates = sorted((i.base_name for i in entries if i.type == pafs.FileType.Directory), reverse=True)
    for date in dates:
        run_dir = f"{paths.root}/runs/{date}/{paths.task}"
        if date < paths.run_date and (not finished_only or is_published(paths.fs, run_dir)):
            found = read_json(paths.fs, f"{run_dir}/summary.json")
            if found:
                return found
    return None


def drift_references(ctx: RunContext) -> dict[str, tuple[str, dict[str, Any]]]:
    """What tonight's profiles are compared with: the previous night's splits, and the training data of
    the champion that tonight competes with (compared with each of tonight's splits)."""
    paths = ctx.paths
    references: dict[str, tuple[str, dict[str, Any]]] = {}
    # A night that drift blocked is no reference: the night after it would be compared with the outlier.
    previous = previous_summary(paths, finished_only=True)
    if previous and previous.get("profile"):
        references["previous"] = (f"the previous night ({previous['run_id']})", previous["profile"])
    champion = ModelStore(paths).champion_before(paths.run_date)
    if champion is not None:
        night = read_json(paths.fs, f"{paths.root}/runs/{champion['version']}/{paths.task}/summary.json")
        train = ((night or {}).get("profile") or {}).get("train")
        if train:
            what = f"champion {paths.task}-{champion['version']}'s training data"
            references["champion_train"] = (what, {"*": train})
    return references


@dataclass(frozen=True)
class Candidate:
    """Tonight's model, stored as a version, and the champion it competes with."""

    version: str
    rival: dict[str, Any] | None  # champion_before: {"version", "test_accuracy"}, or None
    rival_uri: str | None
    was_champion: bool  # a forced rerun of the champion's own night
    stored: bool  # the store holds this model directory's copy for the first time
    replaced: bool  # force=true replaced a stored version


def store_candidate(ctx: RunContext) -> Candidate:
    """Store tonight's model as a version of the model store (a forced night replaces its own)."""
    paths = ctx.paths
    store = ModelStore(paths)
    version = paths.run_date
    current = store.champion()
    rival = store.champion_before(version)
    replaced = ctx.job.force and is_published(paths.fs, store.version_path(version))
    stored = store.add_version(version, paths.path("model"), replace=ctx.job.force)
    rival_uri = store.version_uri(rival["version"]) if rival else None
    was_champion = (current or {}).get("version") == version
    return Candidate(version, rival, rival_uri, was_champion, stored, replaced)


def apply_promotion(ctx: RunContext, candidate: Candidate, decision: Decision, accuracy: float) -> Promotion:
    """Move the champion pointer as the gate decided (champion.json records the model's test
    ``accuracy``); keep ``keep_versions`` versions."""
    store = ModelStore(ctx.paths)
    if decision.promoted and (candidate.stored or not candidate.was_champion):
        store.set_champion(candidate.version, accuracy, ctx.run_id)
    elif not decision.promoted and candidate.was_champion:
        # A forced rerun replaced the champion's own night with a worse model: back to the one before it.
        if candidate.rival is None:
            store.clear_champion()
        else:
            store.set_champion(candidate.rival["version"], candidate.rival["test_accuracy"], ctx.run_id)
    deleted = store.apply_retention(ctx.job.keep_versions)
    log.info("%s: %s (%s)", ctx.task, "promoted" if decision.promoted else "not promoted", decision.reason)
    champion = None
    if decision.champion_version is not None:
        uri = store.version_uri(decision.champion_version)
        champion = ScoringModel(uri, f"{ctx.task}-{decision.champion_version}")
    return Promotion(decision, deleted, candidate.replaced, champion)


def scoring_model(ctx: RunContext, model: str | None) -> ScoringModel:
    """``--model`` as given, or the task's champion: never a model the promotion gate did not promote."""
    if model is not None:
        return ScoringModel(model, model)  # model_version names the model as it was asked for
    store = ModelStore(ctx.paths)
    champion = store.champion()
    if champion is None:
        raise DlbatchError(
            f"{ctx.task}: no champion in {store.uri_root} yet (jobs/nightly.py promotes one); to score with a "
            f"model of your choice pass --model, e.g. --model {ctx.paths.uri('model')}"
        )
    return ScoringModel(store.version_uri(champion["version"]), f"{ctx.task}-{champion['version']}")


def write_summary(ctx: RunContext, summary: dict[str, Any]) -> str:
    """``summary.json`` and the self-contained ``report.html`` beside it; returns the page."""
    paths = ctx.paths
    write_json(paths.fs, paths.path("summary.json"), summary)
    page = render_report(summary, previous_summary(paths))
    with paths.fs.open_output_stream(paths.path("report.html")) as out:
        out.write(page.encode())
    return page
