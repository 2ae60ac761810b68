"""Batch inference: a callable class for ``map_batches`` that loads the model once per actor."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dlbatch.checkpoint import load_meta, load_model
from dlbatch.cluster import current_data_nodes, use_assigned_cpus
from dlbatch.config import PredictConfig, TaskConfig
from dlbatch.models import fast_layout
from dlbatch.preprocess import preprocess_batch, to_arrow
from dlbatch.profile import PROFILE_COLUMNS

PRED_COLUMNS = ["pred_index", "pred_label", "confidence", "probs"]

log = logging.getLogger("dlbatch")


def preprocess_spec(kind: str, task_cfg: TaskConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything ``preprocess_batch`` needs, from the task config (column names) and the model's metadata
    (image shape, tokenizer, label map: always the ones the model was trained with)."""
    data = task_cfg.data
    args = meta["model_args"]
    spec = {
        "kind": kind,
        "id_column": data.id_column,
        "label_column": data.label_column,
        "label_type": meta["label_type"],
        "label_names": meta["label_names"],
        "num_classes": len(meta["label_names"]),
        "profile": task_cfg.profile,
    }
    if kind == "image":
        spec.update(
            feature_column=task_cfg.feature_column,
            channels=args["in_channels"],
            height=args["height"],
            width=args["width"],
            resize=task_cfg.image.resize,
        )
    else:
        spec.update(
            feature_column=task_cfg.feature_column,
            tokenizer=meta["tokenizer"],
            max_length=meta["max_length"],
        )
    return spec


def _local_checkpoint(ckpt_path: str, tmp: str) -> str:
    if "://" not in ckpt_path:
        return ckpt_path
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(ckpt_path)
    pafs.copy_files(path, tmp, source_filesystem=fs)
    return tmp


# Columns of a preprocessed batch (``prepare_batch``) that carry ``preprocess_batch``'s output to the
# model's process; prefixed so they cannot meet a passthrough column's name.
PREPARED = "__dlbatch_"
_ARRAYS = {"x", "tokens", "length", "y"}  # numpy in ``preprocess_batch``'s output; the rest stay Arrow


def _spec_from_checkpoint(ckpt_path: str, task_cfg: TaskConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        meta = load_meta(_local_checkpoint(ckpt_path, tmp))
    return preprocess_spec(meta["kind"], task_cfg, meta)


# Per worker process, the last thing built for a ``map_batches`` function, keyed by what it was built from:
# a Ray worker process outlives its tasks, so the first batch it sees builds it and later ones reuse it.
_PROCESS_CACHE: dict[str, tuple[str, Any]] = {}


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


def _process_cached(name: str, build, *args):
    """``build(*args)``, once per process while ``args`` stay the same (rebuilt when they change)."""
    key = json.dumps(args, sort_keys=True, default=_plain)
    hit = _PROCESS_CACHE.get(name)
    if hit is None or hit[0] != key:
        _PROCESS_CACHE.pop(name, None)  # the old one (a model) is freed before the new one is built
        _PROCESS_CACHE[name] = hit = (key, build(*args))
    return hit[1]


def prepare_batch(
    batch: pa.Table, ckpt_path: str, task_cfg: TaskConfig, with_labels: bool = False
) -> pa.Table:
    """``map_batches`` function of the CPU stage in front of an actor pool: decode / tokenize here, on
    every CPU, so that a GPU actor only runs the model. Decoding in the one actor that holds the GPU
    would leave the GPU waiting on a single core. Passthrough columns ride along under their own names."""
    spec = _process_cached("spec", _spec_from_checkpoint, ckpt_path, task_cfg)
    cols = preprocess_batch(batch, spec, with_labels=with_labels)
    table = to_arrow({PREPARED + name: value for name, value in cols.items()})
    for name in task_cfg.data.passthrough_columns:
        table = table.append_column(name, batch.column(name))
    return table


def _unpack_prepared(batch: pa.Table) -> dict[str, Any]:
    """``preprocess_batch``'s columns back from a ``prepare_batch`` table (tensors zero-copy)."""
    cols: dict[str, Any] = {}
    for name in batch.column_names:
        if not name.startswith(PREPARED):
            continue
        key, col = name[len(PREPARED) :], batch.column(name)
        if key in _ARRAYS:
            parts = [chunk.to_numpy(zero_copy_only=False) for chunk in col.chunks]
            cols[key] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        else:
            cols[key] = col.combine_chunks()
    return cols


class Predictor:
    """``map_batches`` callable: raw Arrow batch in, one output row per input row out.

    Rows that cannot be used get null predictions and a ``reject_reason``; routing them to the rejects
    output happens at publish time, so nothing is dropped here.
    """

    def __init__(
        self,
        ckpt_path: str,
        task_cfg: TaskConfig,
        run_info: dict[str, Any],
        with_labels: bool = False,
        prepared: bool = False,
    ):
        use_assigned_cpus()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            model, meta = load_model(_local_checkpoint(ckpt_path, tmp), self.device)
        self.model = fast_layout(model)
        self.kind = meta["kind"]
        self.spec = preprocess_spec(self.kind, task_cfg, meta)
        self.label_names = pa.array(meta["label_names"], pa.string())
        self.passthrough = list(task_cfg.data.passthrough_columns)
        self.id_column = task_cfg.data.id_column
        self.run_info = run_info
        self.with_labels = with_labels
        self.prepared = prepared  # batches come from ``prepare_batch``, already decoded / tokenized

    @torch.inference_mode()
    def _probs(self, cols: dict[str, Any], ok: np.ndarray) -> np.ndarray:
        if self.kind == "image":
            inputs = (torch.from_numpy(cols["x"][ok]).to(self.device, non_blocking=True),)
        else:
            inputs = (
                torch.from_numpy(cols["tokens"][ok]).to(self.device, non_blocking=True),
                torch.from_numpy(cols["length"][ok]),
            )
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            logits = self.model(*inputs)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if self.prepared:
            cols = _unpack_prepared(batch)
        else:
            cols = preprocess_batch(batch, self.spec, with_labels=self.with_labels)
        reasons = cols["reject_reason"]
        ok = np.asarray(reasons.is_null())
        k = len(self.label_names)
        probs = np.zeros((n, k), dtype=np.float32)
        if ok.any():
            probs[ok] = self._probs(cols, ok)
        pred = probs.argmax(1).astype(np.int32)
        mask = pa.array(~ok)
        out = {self.id_column: cols["id"]}
        for name in self.passthrough:
            out[name] = batch.column(name)
        out["pred_index"] = pa.array(pred, mask=~ok)
        out["pred_label"] = pc.if_else(
            pa.array(ok), self.label_names.take(pa.array(pred)), pa.scalar(None, pa.string())
        )
        out["confidence"] = pa.array(probs.max(1), mask=~ok)
        flat = pa.array(probs.reshape(-1))
        out["probs"] = pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat, mask=mask
        )
        out["model_version"] = pa.array([self.run_info["model_version"]] * n, pa.string())
        out["run_date"] = pa.array([self.run_info["run_date"]] * n, pa.string())
        if self.with_labels:
            out["label_index"] = pa.array(cols["y"])
        for name in PROFILE_COLUMNS[self.kind]:  # summed for the split's input profile, never published
            if name in cols:
                out[name] = cols[name] if isinstance(cols[name], pa.Array) else pa.array(cols[name])
        out["source"] = cols["source"]
        out["reject_reason"] = reasons
        return pa.table(out)


READ_WRITE_CPUS = 2  # left free for Ray Data's read and write tasks when sizing a CPU actor pool


def free_resources(settle_s: float = 2.0) -> dict[str, float]:
    """The cluster's CPUs and GPUs that nothing holds now. What the stage before just released comes back
    within moments, so wait up to ``settle_s`` for it; what other work holds stays held."""
    import ray

    def short() -> bool:
        return any(free.get(k, 0.0) < total.get(k, 0.0) for k in ("CPU", "GPU"))

    total, free = ray.cluster_resources(), ray.available_resources()
    deadline = time.monotonic() + settle_s
    while short() and time.monotonic() < deadline:
        time.sleep(0.1)
        free = ray.available_resources()
    if short():
        log.info(
            "other work holds part of the cluster: %g of %g CPUs and %g of %g GPUs are free for inference",
            free.get("CPU", 0.0), total.get("CPU", 0.0), free.get("GPU", 0.0), total.get("GPU", 0.0),
        )  # fmt: skip
    return free


def actor_pool_size(pcfg: PredictConfig, cluster: dict[str, float]) -> int:
    """Configured ``num_actors``, or one actor per slot of the cluster's *free* resources: a fixed pool
    sized from its totals waits forever for actors that cannot be placed while other work holds part of
    it, and takes the CPUs its own read tasks need.

    A fixed pool, not an autoscaling one: on a small cluster Ray Data's autoscaler can keep a (1, n) pool
    at one actor for a whole run, its utilization threshold never crossed (docs/PERFORMANCE.md)."""
    if pcfg.num_actors:
        return int(pcfg.num_actors)
    if pcfg.gpus_per_actor > 0:
        return max(1, int(cluster.get("GPU", 0) // pcfg.gpus_per_actor))
    return max(1, int((cluster.get("CPU", 1) - READ_WRITE_CPUS) // pcfg.cpus_per_actor))


def predict_batch(
    batch: pa.Table,
    ckpt_path: str,
    task_cfg: TaskConfig,
    run_info: dict[str, Any],
    with_labels: bool = False,
) -> pa.Table:
    """``map_batches`` function for task mode: the process's cached Predictor scores the batch (one per
    process, rebuilt when another model or run comes)."""
    predictor = _process_cached("predictor", Predictor, ckpt_path, task_cfg, run_info, with_labels)
    return predictor(batch)


def use_actors(pcfg: PredictConfig) -> bool:
    """``compute: auto`` picks actors for GPU inference (one model per GPU, loaded once) and tasks on CPUs.

    On CPUs, tasks run in Ray's already-started worker processes, which keep torch and the model (see
    ``predict_batch``) from one task to the next: no actor start-up per dataset, and faster than a CPU
    actor pool once the workers are warm (docs/PERFORMANCE.md)."""
    if pcfg.compute == "auto":
        return pcfg.gpus_per_actor > 0
    return pcfg.compute == "actors"


def preprocess_in_tasks(pcfg: PredictConfig) -> bool:
    """With an actor pool: decode / tokenize in a CPU task stage in front of it (``preprocess``; auto:
    when the actors hold GPUs)."""
    if pcfg.preprocess == "auto":
        return pcfg.gpus_per_actor > 0
    return pcfg.preprocess == "tasks"


def predict_dataset(
    ds, ckpt_path: str, task_cfg: TaskConfig, run_info: dict[str, Any], with_labels: bool = False
):
    """Lazy Ray Dataset of predictions over ``ds`` (raw rows), on tasks or an actor pool (config)."""
    import ray

    pcfg = task_cfg.predict
    kwargs = {"ckpt_path": ckpt_path, "task_cfg": task_cfg, "run_info": run_info, "with_labels": with_labels}
    if not use_actors(pcfg):
        return ds.map_batches(
            predict_batch,
            fn_kwargs=kwargs,
            batch_format="pyarrow",
            batch_size=pcfg.batch_size,
            num_cpus=pcfg.cpus_per_actor,
            # A task whose process dies (killed, OOM, node lost) is run again (Ray's default for tasks: 3
            # retries on system failures); its output file has a deterministic name, so a retry replaces
            # rather than duplicates it (tests/test_faults.py kills one).
        )
    if preprocess_in_tasks(pcfg):
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs={"ckpt_path": ckpt_path, "task_cfg": task_cfg, "with_labels": with_labels},
            batch_format="pyarrow",
            batch_size=pcfg.batch_size,
            num_cpus=1,
        )
        kwargs["prepared"] = True
    elsewhere = current_data_nodes().elsewhere
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=pcfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actor_pool_size(pcfg, free_resources())),
        num_cpus=pcfg.cpus_per_actor,
        num_gpus=pcfg.gpus_per_actor,
        # The model's actors keep off the data nodes (a dataset's own selector would send them there).
        **({"label_selector": elsewhere} if elsewhere else {}),
        # An actor that dies (node lost, OOM) is restarted and its batches retried: Ray Data's actor pools
        # default to max_restarts=-1 and max_task_retries=-1 (tests/test_faults.py kills one to check).
    )
