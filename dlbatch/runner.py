"""What the jobs run: train, predict, nightly (train -> evaluate -> predict), plus the CLI wrapper.

Each ``run_*`` takes a ``JobConfig`` and returns the summary dict that it also writes as ``summary.json``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dlbatch.cluster import ensure_ray
from dlbatch.config import JobConfig, Task, load_config
from dlbatch.data import resolve_path
from dlbatch.errors import DlbatchError, QualityError
from dlbatch.pipeline import (
    TaskData,
    TaskResult,
    accuracy_on_test,
    evaluate_model,
    inspect_task,
    learn_from_train,
    predict_scores,
    train_model,
)
from dlbatch.profile import compare as compare_profiles
from dlbatch.profile import describe as describe_drift
from dlbatch.quality import describe as describe_quality
from dlbatch.registry import ModelStore
from dlbatch.report import render_report
from dlbatch.store import (
    RunPaths,
    is_published,
    mark_published,
    read_json,
    remove_if_exists,
    run_paths,
    write_json,
)
from dlbatch.tracking import log_night

log = logging.getLogger("dlbatch")


def _paths(cfg: JobConfig, task: Task) -> RunPaths:
    return run_paths(cfg.output_root, task, cfg.effective_run_date().isoformat())


@functools.cache
def _versions() -> dict[str, str | None]:
    """Package versions and git commit, once per process (the same for every task of a run)."""
    import importlib.metadata
    import subprocess

    import ray
    import torch

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        version = importlib.metadata.version("dlbatch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"dlbatch": version, "ray": ray.__version__, "torch": torch.__version__, "git_commit": commit}


def _task_summary(result: TaskResult, started: float, cfg: JobConfig | None = None) -> dict[str, Any]:
    return {
        "task": result.task,
        "run_id": result.run_id,
        "versions": dict(_versions()),
        "config": cfg.task(result.task).model_dump(mode="json") if cfg else None,
        "test_accuracy": result.metrics.get("test_accuracy"),
        "metrics": result.metrics,
        "history": result.history,
        "rows": {split: asdict(c) for split, c in result.rows.items()},
        "profile": result.profile,
        "drift": result.drift,
        "paths": result.paths,
        "durations_s": {**result.durations_s, "total": time.perf_counter() - started},
    }


def _previous_summary(paths: RunPaths, finished_only: bool = False) -> dict[str, Any] | None:
    """The latest earlier run date's summary for this task, for night-over-night comparison;
    ``finished_only``: of a nightly run that finished (not one that drift blocked or that was killed)."""
    infos = paths.fs.get_file_info(pafs.FileSelector(f"{paths.root}/runs", allow_not_found=True))
    dates = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory), reverse=True)
    for date in dates:
        run_dir = f"{paths.root}/runs/{date}/{paths.task}"
        if date < paths.run_date and (not finished_only or is_published(paths.fs, run_dir)):
            found = read_json(paths.fs, f"{run_dir}/summary.json")
            if found:
                return found
    return None


def _write_task_summary(paths: RunPaths, summary: dict[str, Any]) -> str:
    summary["paths"]["summary"] = paths.uri("summary.json")
    summary["paths"]["report"] = paths.uri("report.html")
    write_json(paths.fs, paths.path("summary.json"), summary)
    page = render_report(summary, _previous_summary(paths))
    with paths.fs.open_output_stream(paths.path("report.html")) as out:
        out.write(page.encode())
    return page


def _forget_run(paths: RunPaths) -> None:
    """``force``: delete this run date's outputs and Ray Train checkpoints so everything is redone."""
    fs, root = resolve_path(paths.storage_path)
    remove_if_exists(fs, f"{root}/{paths.run_id}")
    remove_if_exists(paths.fs, paths.path())


def _prune_checkpoints(cfg: JobConfig, paths: RunPaths) -> list[str]:
    """Delete the Ray Train checkpoints of this task's run dates older than the newest
    ``keep_checkpoint_runs``, each only once its model is published: the model (and the model store)
    holds what a finished run needs, and a run that never published may still be resumed."""
    fs, root = resolve_path(paths.storage_path)
    prefix = f"{paths.task}-"
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dates = sorted(
        i.base_name.removeprefix(prefix)
        for i in infos
        if i.type == pafs.FileType.Directory
        and re.fullmatch(rf"{prefix}\d{{4}}-\d{{2}}-\d{{2}}", i.base_name)
    )
    doomed = []
    for date in dates[: -cfg.keep_checkpoint_runs]:
        if date != paths.run_date and is_published(
            paths.fs, run_paths(cfg.output_root, paths.task, date).path("model")
        ):
            remove_if_exists(fs, f"{root}/{prefix}{date}")
            doomed.append(f"{prefix}{date}")
    if doomed:
        log.info("%s: deleted the Ray Train checkpoints of %s (keep_checkpoint_runs=%d)", paths.task,
                 ", ".join(doomed), cfg.keep_checkpoint_runs)  # fmt: skip
    return doomed


@dataclass
class _Prepared:
    """A task past its data checks, ready to train (or already finished: ``done``)."""

    paths: RunPaths
    result: TaskResult
    data: TaskData | None = None
    done: dict[str, Any] | None = None
    seconds: float = 0.0


def prepare_task(cfg: JobConfig, task: Task, infos: dict) -> _Prepared:
    """``force`` forgets the run; a finished nightly run is not redone; otherwise the label map (and the
    tokenizer) are learned from the training split, which checks its label values."""
    started = time.perf_counter()
    paths = _paths(cfg, task)
    result = TaskResult(task=task, run_id=paths.run_id)
    if cfg.force:
        _forget_run(paths)
    elif "score" in infos and is_published(paths.fs, paths.path()):
        log.info("%s: run %s already finished; not redone (force=true to redo)", task, paths.run_id)
        done = {**read_json(paths.fs, paths.path("summary.json")), "skipped": True}
        return _Prepared(paths, result, done=done)
    data = learn_from_train(cfg, task, infos, paths)
    return _Prepared(paths, result, data, seconds=time.perf_counter() - started)


def train_and_evaluate(cfg: JobConfig, task: Task, infos: dict, prepared: _Prepared | None = None) -> dict:
    prepared = prepared or prepare_task(cfg, task, infos)
    if prepared.done is not None:
        return prepared.done
    started = time.perf_counter() - prepared.seconds
    paths, result, data = prepared.paths, prepared.result, prepared.data
    model_uri = train_model(cfg, task, data, paths, result)
    result.metrics["deleted_checkpoint_runs"] = _prune_checkpoints(cfg, paths)
    evaluate_model(cfg, task, data, model_uri, paths, result)
    result.metrics["label_variants"] = data.meta.get("label_variants", [])
    quality = result.metrics["quality"]
    floor_failure = None if quality["passed"] else describe_quality(quality)
    references = _drift_references(paths)
    drift_failure = _check_drift(cfg, task, result, references, ("train", "val", "test"))
    if "score" in infos:
        champion = promote(cfg, task, data, paths, result, floor_failure or drift_failure)
        if champion is not None:

            def gate(profile: dict[str, Any] | None) -> str | None:
                result.profile["score"] = profile
                return _check_drift(cfg, task, result, references, ("score",))

            predict_scores(cfg, task, data, champion[0], paths, result, model_version=champion[1], gate=gate)
        verdict = _night_verdict(result, floor_failure, drift_failure)
    elif floor_failure:
        verdict = {"status": "below_floor", "reason": floor_failure}
    elif (result.drift or {}).get("drifted"):
        result.drift["blocked"] = False  # nothing to block: this job promotes and scores nothing
        what = describe_drift(result.drift["drifted"], result.drift["references"], result.drift["threshold"])
        verdict = {
            "status": "drifted",
            "reason": f"{what}; not promoted by this job (jobs/nightly.py promotes)",
        }
    else:
        verdict = {"status": "trained", "reason": f"test accuracy {result.metrics['test_accuracy']:.2%}; "
                   "not promoted by this job (jobs/nightly.py promotes)"}  # fmt: skip
    summary = {"verdict": verdict, **_task_summary(result, started, cfg)}
    page = _write_task_summary(paths, summary)
    if "score" in infos and not (result.drift or {}).get("blocked"):
        # The whole nightly run is done. A night that drift blocked is not: rerun with drift.action=warn
        # to accept it (its model and scored parts are reused).
        mark_published(paths.fs, paths.path(), {"run_id": paths.run_id})
    log_night(cfg, summary, paths, page)  # after everything is published: it can only cost a warning
    return summary


def _drift_references(paths: RunPaths) -> dict[str, tuple[str, dict[str, Any]]]:
    """What tonight's profiles are compared with: the previous night's splits, and the training data of
    the champion that tonight competes with (compared with each of tonight's splits)."""
    references: dict[str, tuple[str, dict[str, Any]]] = {}
    # A night that drift blocked is no reference: the night after it would be compared with the outlier.
    previous = _previous_summary(paths, finished_only=True)
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


def _check_drift(
    cfg: JobConfig, task: Task, result: TaskResult, references: dict, splits: tuple[str, ...]
) -> str | None:
    """Compare ``splits`` with the references, into ``result.drift``; warn of what drifted. Returns why
    the night is blocked (drift.action=block), or None."""
    if not cfg.task(task).profile:
        return None
    night = {s: result.profile[s] for s in splits if result.profile.get(s)}
    found = compare_profiles(night, references, task, cfg.drift.threshold)
    drift = result.drift or {
        **found, "action": cfg.drift.action, "blocked": False, "distances": {}, "drifted": [],
        "reference_profiles": {name: splits for name, (_, splits) in references.items()},
    }  # fmt: skip
    drift["distances"].update(found["distances"])
    drift["drifted"].extend(found["drifted"])
    result.drift = drift
    if not found["drifted"]:
        return None
    what = describe_drift(found["drifted"], found["references"], cfg.drift.threshold)
    log.warning("%s: %s", task, what)
    if cfg.drift.action != "block":
        return None
    drift["blocked"] = True
    return f"{what} (drift.action=block)"


def _night_verdict(
    result: TaskResult, floor_failure: str | None, drift_failure: str | None
) -> dict[str, str]:
    promotion = result.metrics["promotion"]
    scored = promotion["champion_version"]
    withheld = result.metrics.get("predictions_withheld")
    if withheld:
        then = "predictions withheld"
    elif scored:
        then = f"scored with champion {scored}"
    else:
        then = "no predictions published (no champion yet)"
    if floor_failure:
        return {"status": "below_floor", "reason": f"{floor_failure}; not promoted, {then}"}
    drift = result.drift or {}
    if drift.get("drifted"):
        what = describe_drift(drift["drifted"], drift["references"], drift["threshold"])
        if drift_failure:
            model = "not promoted"
        elif promotion["promoted"]:
            model = "promoted"
        else:
            model = f"not promoted ({promotion['reason']})"
        how = "drift.action=block" if drift.get("blocked") else "drift.action=warn: nothing withheld"
        return {"status": "drifted", "reason": f"{what}; {model}, {then} ({how})"}
    if promotion["promoted"]:
        return {"status": "promoted", "reason": f"promoted: {promotion['reason']}"}
    return {"status": "kept_champion", "reason": promotion["reason"]}


def promote(
    cfg: JobConfig, task: Task, data, paths: RunPaths, result: TaskResult, floor_failure: str | None = None
) -> tuple[str, str] | None:
    """Store this run's model as a version, apply the promotion gate, return the champion to score with
    (uri, model_version), or None when there is none."""
    store = ModelStore(paths)
    version = paths.run_date
    current = store.champion()
    rival = store.champion_before(version)
    replaced = cfg.force and is_published(paths.fs, store.version_path(version))
    stored = store.add_version(version, paths.path("model"), replace=cfg.force)
    rival_acc = None
    if rival is not None and floor_failure is None:
        # Re-measured on tonight's test data: last night's number was on other data.
        rival_acc = accuracy_on_test(task, data, store.version_uri(rival["version"]), paths)
    decision = store.decide(
        version, result.metrics["test_accuracy"], rival, rival_acc, cfg.promotion_tolerance, floor_failure
    )
    is_champion = (current or {}).get("version") == version
    if decision.promoted and (stored or not is_champion):
        store.set_champion(version, result.metrics["test_accuracy"], paths.run_id)
    elif not decision.promoted and is_champion:
        # A forced rerun replaced the champion's own night with a worse model: back to the one before it.
        if rival is None:
            store.clear_champion()
        else:
            store.set_champion(rival["version"], rival["test_accuracy"], paths.run_id)
    deleted = store.apply_retention(cfg.keep_versions)
    log.info("%s: %s%s", task, "promoted" if decision.promoted else "not promoted", f" ({decision.reason})")
    result.metrics["promotion"] = {
        **decision.as_dict(), "deleted_versions": deleted, "replaced_version": replaced
    }  # fmt: skip
    if decision.champion_version is None:
        return None
    result.paths["champion"] = store.version_uri(decision.champion_version)
    return store.version_uri(decision.champion_version), f"{task}-{decision.champion_version}"


def _check_quality(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After every task has written its outputs: a model below the quality floor fails the job."""
    failed = [
        s for s in summaries
        if s.get("verdict", {}).get("status") == "below_floor" or (s.get("drift") or {}).get("blocked")
    ]  # fmt: skip
    if failed:
        raise QualityError("; ".join(f"{s['task']}: {s['verdict']['reason']}" for s in failed), summaries)
    return summaries


def _train_tasks(cfg: JobConfig, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    # Every split of every task is checked from its Parquet footers before Ray starts, and every task's
    # label values (and tokenizer) before any task trains: a bad second task fails before the first trains.
    infos = {task: inspect_task(cfg, task, splits) for task in cfg.tasks}
    for task in cfg.tasks:
        rows = ", ".join(f"{s} {i.num_rows:,} rows in {len(i.files)} file(s)" for s, i in infos[task].items())
        log.info("plan: %s for %s: %s", task, cfg.effective_run_date(), rows)
    ensure_ray(cfg)
    prepared = {task: prepare_task(cfg, task, infos[task]) for task in cfg.tasks}
    return _check_quality([train_and_evaluate(cfg, task, infos[task], prepared[task]) for task in cfg.tasks])


def run_train(cfg: JobConfig) -> list[dict[str, Any]]:
    return _train_tasks(cfg, ("train", "val", "test"))


def run_nightly(cfg: JobConfig) -> list[dict[str, Any]]:
    return _train_tasks(cfg, ("train", "val", "test", "score"))


def _scoring_model(cfg: JobConfig, task: Task, model: str | None) -> tuple[str, str]:
    """``--model`` as given, or the task's champion: never a model the promotion gate did not promote."""
    paths = _paths(cfg, task)
    if model is not None:
        return model, model  # model_version names the model as it was asked for
    store = ModelStore(paths)
    champion = store.champion()
    if champion is None:
        raise DlbatchError(
            f"{task}: no champion in {store.uri_root} yet (jobs/nightly.py promotes one); to score with a "
            f"model of your choice pass --model, e.g. --model {paths.uri('model')}"
        )
    return store.version_uri(champion["version"]), f"{task}-{champion['version']}"


def run_predict(cfg: JobConfig, model: str | None = None) -> list[dict[str, Any]]:
    """Score each task's score split with its champion, or with ``model`` (any model directory or URI;
    the predictions' ``model_version`` is then that path or URI)."""
    infos = {task: inspect_task(cfg, task, ("score",)) for task in cfg.tasks}
    chosen = {task: _scoring_model(cfg, task, model) for task in cfg.tasks}
    ensure_ray(cfg)
    summaries = []
    for task in cfg.tasks:
        started = time.perf_counter()
        paths = _paths(cfg, task)
        model_uri, version = chosen[task]
        result = TaskResult(task=task, run_id=paths.run_id)
        data = TaskData(splits=infos[task], meta={})
        predict_scores(cfg, task, data, model_uri, paths, result, model_version=version)
        result.paths["model"] = model_uri
        summaries.append(_task_summary(result, started, cfg))
    return summaries


def format_summary(summaries: list[dict[str, Any]]) -> str:
    lines = []
    for s in summaries:
        acc = s.get("test_accuracy")
        acc_text = f"test accuracy {acc:.2%}" if acc is not None else "no evaluation"
        rows = ", ".join(
            f"{k}: {v['used']}/{v['read']} used, {v['rejected']} rejected" for k, v in s["rows"].items()
        )
        lines.append(f"[{s['task']}] {acc_text} | {rows} | {s['durations_s']['total']:.0f}s")
        promotion = s.get("metrics", {}).get("promotion")
        status = s.get("verdict", {}).get("status")
        if status == "below_floor":
            lines.append(f"  BELOW THE QUALITY FLOOR: {s['verdict']['reason']}")
        elif status == "drifted":
            lines.append(f"  DRIFTED: {s['verdict']['reason']}")
        elif promotion:
            verdict = "promoted" if promotion["promoted"] else "NOT promoted"
            lines.append(
                f"  model {verdict}: {promotion['reason']}; scored with {promotion['champion_version']}"
            )
        if promotion and promotion.get("replaced_version"):
            lines.append(f"  force=true: this night's model replaced version {s['run_id'].split('-', 1)[1]} "
                         "in the model store and was decided again")  # fmt: skip
        for key in ("predictions", "model", "summary", "report"):
            if key in s["paths"]:
                lines.append(f"  {key}: {s['paths'][key]}")
    return "\n".join(lines)


def main(
    argv: list[str] | None,
    run: Callable[..., list[dict[str, Any]]],
    description: str,
    with_model: bool = False,
) -> int:
    """CLI wrapper shared by the jobs: config + overrides in, one-line error and non-zero exit on failure."""
    parser = _OneLineErrors(description=description)
    parser.add_argument("--config", help="YAML config file (default: built-in defaults = the demo)")
    parser.add_argument("--run-date", help="run date YYYY-MM-DD (default: today, UTC)")
    if with_model:
        parser.add_argument(
            "--model", help="checkpoint directory or URI (default: this run date's trained model)"
        )
    parser.add_argument(
        "--verbose", action="store_true", help="also log Ray Data's per-dataset execution banners"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. image.train.epochs=2"
    )
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = list(args.overrides) + ([f"run_date={args.run_date}"] if args.run_date else [])
        overrides += ["verbose=true"] if args.verbose else []
        cfg = load_config(args.config, overrides)
        summaries = run(cfg, args.model) if with_model else run(cfg)
    except QualityError as err:  # the night's outputs are written; its summary still ends the log
        _stop_ray()
        print(format_summary(err.summaries))
        print(f"dlbatch: error: {err}", file=sys.stderr)
        return 3
    except DlbatchError as err:
        print(f"dlbatch: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Ray wraps worker errors; show the root cause in one line, details in the log
        log.debug("failure", exc_info=True)
        print(f"dlbatch: error: {_root_cause(err)}", file=sys.stderr)
        return 1
    _stop_ray()
    print(format_summary(summaries))
    return 0


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # flush and stop Ray's log streaming so the summary is the last thing printed


class _OneLineErrors(argparse.ArgumentParser):
    """A command-line mistake is one ``dlbatch: error:`` line (exit 2), like every other error."""

    def error(self, message: str):
        print(f"dlbatch: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _root_cause(err: BaseException) -> str:
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
