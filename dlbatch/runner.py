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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dlbatch.cluster import ensure_ray
from dlbatch.config import JobConfig, Task, load_config
from dlbatch.data import resolve_path
from dlbatch.errors import DlbatchError
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
        "paths": result.paths,
        "durations_s": {**result.durations_s, "total": time.perf_counter() - started},
    }


def _previous_summary(paths: RunPaths) -> dict[str, Any] | None:
    """The latest earlier run date's summary for this task, for night-over-night comparison."""
    infos = paths.fs.get_file_info(pafs.FileSelector(f"{paths.root}/runs", allow_not_found=True))
    dates = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory), reverse=True)
    for date in dates:
        if date < paths.run_date:
            found = read_json(paths.fs, f"{paths.root}/runs/{date}/{paths.task}/summary.json")
            if found:
                return found
    return None


def _write_task_summary(paths: RunPaths, summary: dict[str, Any]) -> None:
    summary["paths"]["summary"] = paths.uri("summary.json")
    summary["paths"]["report"] = paths.uri("report.html")
    write_json(paths.fs, paths.path("summary.json"), summary)
    with paths.fs.open_output_stream(paths.path("report.html")) as out:
        out.write(render_report(summary, _previous_summary(paths)).encode())


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


def train_and_evaluate(cfg: JobConfig, task: Task, infos: dict) -> dict[str, Any]:
    started = time.perf_counter()
    paths = _paths(cfg, task)
    if cfg.force:
        _forget_run(paths)
    elif "score" in infos and is_published(paths.fs, paths.path()):
        log.info("%s: run %s already finished; not redone (force=true to redo)", task, paths.run_id)
        return {**read_json(paths.fs, paths.path("summary.json")), "skipped": True}
    result = TaskResult(task=task, run_id=paths.run_id)
    data = learn_from_train(cfg, task, infos, paths)
    model_uri = train_model(cfg, task, data, paths, result)
    result.metrics["deleted_checkpoint_runs"] = _prune_checkpoints(cfg, paths)
    evaluate_model(cfg, task, data, model_uri, paths, result)
    if "score" in infos:
        champion_uri, champion_version = promote(cfg, task, data, paths, result)
        predict_scores(cfg, task, data, champion_uri, paths, result, model_version=champion_version)
    summary = _task_summary(result, started, cfg)
    _write_task_summary(paths, summary)
    if "score" in infos:
        mark_published(paths.fs, paths.path(), {"run_id": paths.run_id})  # the whole nightly run is done
    return summary


def promote(cfg: JobConfig, task: Task, data, paths: RunPaths, result: TaskResult) -> tuple[str, str]:
    """Store this run's model as a version, apply the promotion gate, return the champion to score with."""
    store = ModelStore(paths)
    version = paths.run_date
    store.add_version(version, paths.path("model"))
    current = store.champion()
    champion_acc = None
    if current and current["version"] != version:
        # Re-measured on tonight's test data: last night's number was on other data.
        champion_acc = accuracy_on_test(task, data, store.version_uri(current["version"]), paths)
    decision = store.decide(version, result.metrics["test_accuracy"], champion_acc, cfg.promotion_tolerance)
    if decision.promoted and (current or {}).get("version") != version:
        store.set_champion(version, result.metrics["test_accuracy"], paths.run_id)
    deleted = store.apply_retention(cfg.keep_versions)
    log.info("%s: %s%s", task, "promoted" if decision.promoted else "not promoted", f" ({decision.reason})")
    result.metrics["promotion"] = {**decision.as_dict(), "deleted_versions": deleted}
    result.paths["champion"] = store.version_uri(decision.champion_version)
    return store.version_uri(decision.champion_version), f"{task}-{decision.champion_version}"


def _train_tasks(cfg: JobConfig, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    # Every split of every task is checked before Ray starts or any training runs.
    infos = {task: inspect_task(cfg, task, splits) for task in cfg.tasks}
    for task in cfg.tasks:
        rows = ", ".join(f"{s} {i.num_rows:,} rows in {len(i.files)} file(s)" for s, i in infos[task].items())
        log.info("plan: %s for %s: %s", task, cfg.effective_run_date(), rows)
    ensure_ray(cfg)
    return [train_and_evaluate(cfg, task, infos[task]) for task in cfg.tasks]


def run_train(cfg: JobConfig) -> list[dict[str, Any]]:
    return _train_tasks(cfg, ("train", "val", "test"))


def run_nightly(cfg: JobConfig) -> list[dict[str, Any]]:
    return _train_tasks(cfg, ("train", "val", "test", "score"))


def run_predict(cfg: JobConfig, model: str | None = None) -> list[dict[str, Any]]:
    """Score each task's score split with ``model`` (default: the model trained for this run date)."""
    infos = {task: inspect_task(cfg, task, ("score",)) for task in cfg.tasks}
    for task in cfg.tasks:
        paths = _paths(cfg, task)
        if model is None and not is_published(paths.fs, paths.path("model")):
            raise DlbatchError(
                f"{task}: no trained model at {paths.uri('model')}; run jobs/train.py first or pass --model"
            )
    ensure_ray(cfg)
    summaries = []
    for task in cfg.tasks:
        started = time.perf_counter()
        paths = _paths(cfg, task)
        model_uri = model or paths.uri("model")
        result = TaskResult(task=task, run_id=paths.run_id)
        predict_scores(cfg, task, TaskData(splits=infos[task], meta={}), model_uri, paths, result)
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
        if promotion:
            verdict = "promoted" if promotion["promoted"] else "NOT promoted"
            lines.append(
                f"  model {verdict}: {promotion['reason']}; scored with {promotion['champion_version']}"
            )
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
    except DlbatchError as err:
        print(f"dlbatch: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Ray wraps worker errors; show the root cause in one line, details in the log
        log.debug("failure", exc_info=True)
        print(f"dlbatch: error: {_root_cause(err)}", file=sys.stderr)
        return 1
    import ray

    if ray.is_initialized():
        ray.shutdown()  # flush and stop Ray's log streaming so the summary is the last thing printed
    print(format_summary(summaries))
    return 0


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
