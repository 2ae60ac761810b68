"""Optional MLflow tracking: each task's night as an MLflow run, and its model as a registered version.

What is logged: the task config (flattened) as parameters, the versions and the verdict as tags, per-epoch
metrics (step = epoch) and the test metrics, ``summary.json`` and ``report.html`` as artifacts, and the
night's model directory, registered as a version of ``<experiment>-<task>``. The ``champion`` alias moves
only when dlbatch's own promotion gate promotes; dlbatch's model store stays the source of truth.

Tracking comes after the night's outputs are written and can only cost a warning line: a server that is
down or a bad URI never fails the run. The client is ``mlflow-skinny`` (the ``mlflow`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dlbatch.config import JobConfig
from dlbatch.store import RunPaths

log = logging.getLogger("dlbatch")

# One attempt per request and a short timeout: a server that is down must not hold the night up (MLflow's
# defaults retry with backoff for minutes). A value the user set in the environment wins.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri(cfg: JobConfig) -> str | None:
    return cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def log_night(cfg: JobConfig, summary: dict[str, Any], paths: RunPaths, report_html: str) -> str | None:
    """Log one task's night; returns the MLflow run id, or None (not configured, or it failed: warned)."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient
    except ImportError:
        log.warning("%s: MLflow tracking is configured (%s) but mlflow is not installed "
                    "(pip install 'dlbatch[mlflow]'); not logged", summary["task"], uri)  # fmt: skip
        return None
    try:
        return _log(MlflowClient(tracking_uri=uri, registry_uri=uri), cfg, summary, paths, report_html)
    except Exception as err:  # anything from the client or the server: a warning, never a failed night
        text = str(err).strip().splitlines()
        log.warning("%s: not logged to MLflow at %s (%s: %s)", summary["task"], uri, type(err).__name__,
                    text[0][:300] if text else "")  # fmt: skip
        return None


def _log(client, cfg: JobConfig, summary, paths: RunPaths, report_html: str) -> str:
    from mlflow.entities import Metric, Param

    task = summary["task"]
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    )
    verdict = summary.get("verdict", {})
    tags = {"dlbatch.task": task, "dlbatch.run_date": paths.run_date, "dlbatch.verdict": verdict.get("status", ""),
            **{f"dlbatch.version.{k}": str(v) for k, v in summary["versions"].items()}}  # fmt: skip
    run = client.create_run(experiment_id, run_name=summary["run_id"], tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in _flatten(summary.get("config") or {}).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=params[start : start + 100])
    metrics = []
    for epoch in summary.get("history", []):
        for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "lr"):
            if epoch.get(key) is not None:
                metrics.append(Metric(key, float(epoch[key]), 0, int(epoch["epoch"])))
    tested = {**summary.get("metrics", {}), "test_accuracy": summary.get("test_accuracy")}
    for key in ("test_accuracy", "test_macro_f1", "test_balanced_accuracy"):
        if tested.get(key) is not None:
            metrics.append(Metric(key, float(tested[key]), 0, 0))
    quality = summary.get("metrics", {}).get("quality")
    if quality:
        metrics += [
            Metric(f"baseline_{k}", float(quality[f"{k}_accuracy"]), 0, 0) for k in ("majority", "chance")
        ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        (local / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (local / "report.html").write_text(report_html)
        client.log_artifact(run_id, str(local / "summary.json"))
        client.log_artifact(run_id, str(local / "report.html"))
        promotion = summary.get("metrics", {}).get("promotion")
        if promotion is not None and "model" in summary.get("paths", {}):
            model = local / "model"
            model.mkdir()
            pafs.copy_files(paths.path("model"), str(model), source_filesystem=paths.fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
            client.log_artifacts(run_id, str(model), artifact_path="model")
            _register(client, cfg, task, run, paths.run_date, promotion)
    client.set_terminated(run_id, "FINISHED" if verdict.get("status") != "below_floor" else "FAILED")
    log.info("%s: logged to MLflow (experiment %s, run %s)", task, cfg.tracking.experiment, run_id)
    return run_id


def _register(client, cfg: JobConfig, task: str, run, run_date: str, promotion: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    name = f"{cfg.tracking.experiment}-{task}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"dlbatch {task} models, one version per night")
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags={"dlbatch.run_date": run_date, "dlbatch.promoted": str(promotion["promoted"]).lower()},
    )  # fmt: skip
    if promotion["promoted"]:
        client.set_registered_model_alias(name, "champion", version.version)
        return
    # Not promoted: the alias stays on dlbatch's champion. It moves only if the champion changed without a
    # promotion (a forced rerun of the champion's own night gave it back to the one before).
    champion = promotion.get("champion_version")
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        current = None
    if champion is None or (current is not None and current.tags.get("dlbatch.run_date") == champion):
        return
    candidates = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.tags.get("dlbatch.run_date") == champion
    ]
    if candidates:
        newest = max(candidates, key=lambda v: int(v.version))
        client.set_registered_model_alias(name, "champion", newest.version)
