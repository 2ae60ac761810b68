"""Typed, frozen job configuration: YAML file plus ``key=value`` overrides.

YAML is parsed with ``yaml.safe_load`` (config is data, never code). Unknown keys and wrong types are
errors. The typed objects themselves travel to Ray workers and tasks (pydantic models pickle), so the
types hold on both sides; checkpoints keep ``model_dump(mode="json")``.
"""

from __future__ import annotations

import datetime as dt
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlbatch.errors import ConfigError

Task = Literal["image", "text"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataConfig(_Frozen):
    """Where a task's data lives and how its columns are named. Empty paths mean: use the demo data."""

    train: str | None = None
    val: str | None = None
    test: str | None = None
    score: str | None = None
    label_column: str = "label"
    id_column: str = "id"
    passthrough_columns: tuple[str, ...] = ()
    # Hive partition filter applied to every split, e.g. {"dt": "2026-11-25"}.
    partition: dict[str, str] = Field(default_factory=dict)
    # Labels: ints in [0, num_classes) or strings (mapped through a label map built from train).
    num_classes: int | None = Field(default=None, ge=2)
    # The type of a label taken from Hive partition keys (train/label=3/part-0.parquet, Spark's
    # partitionBy): auto is int when every value is an integer, else string. A label column keeps its type.
    label_type: Literal["auto", "int", "string"] = "auto"


class ImageConfig(_Frozen):
    column: str = "image"
    height: int = Field(default=28, ge=8)
    width: int = Field(default=28, ge=8)
    channels: Literal[1, 3] = 1
    # Images of another size are resized (bilinear) to height x width; with resize off they are rejected.
    resize: bool = True


class AugmentConfig(_Frozen):
    """Training-time augmentation of images (never at validation, test or scoring): a random crop of
    crop_scale of the image's area (aspect 3:4 to 4:3) resized back, and a horizontal flip."""

    # auto: on for 3-channel images (photos), off for 1-channel ones (digits, scans)
    enabled: Literal["auto"] | bool = "auto"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return scale


class TextConfig(_Frozen):
    column: str = "text"
    vocab_size: int = Field(default=10_000, ge=4)
    max_length: int = Field(default=64, ge=1)
    min_count: int = Field(default=1, ge=1)


class CNNConfig(_Frozen):
    # seed: the project's small CNN (conv_channels, hidden). Otherwise a transformers image model type
    # (resnet, convnext, efficientnet, mobilenet_v2, regnet, ...; the backbones extra) with a new head.
    arch: str = "seed"
    # A backbone's weights: a local path or s3:// / gs:// URI of a save_pretrained directory (config.json,
    # model.safetensors, preprocessor_config.json) or of one state_dict / safetensors file. None: random
    # initial weights. Never downloaded from a hub.
    weights: str | None = None
    # The backbone's layers keep their weights for the first N epochs (only the new head learns).
    freeze_epochs: int = Field(default=0, ge=0)
    conv_channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _backbone_only(self) -> CNNConfig:
        if self.arch == "seed" and (self.weights or self.freeze_epochs):
            raise ValueError("weights and freeze_epochs need a backbone: set image.model.arch (e.g. resnet)")
        return self


class GRUConfig(_Frozen):
    embed_dim: int = Field(default=64, ge=1)
    hidden: int = Field(default=64, ge=1)
    dense: int = Field(default=64, ge=1)


class TrainConfig(_Frozen):
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=64, ge=1)  # per worker: the global batch is num_workers x batch_size
    # The recipe (dlbatch/recipe.py): AdamW; lr is the peak rate for a global batch of lr_batch samples,
    # scaled to the real global batch by lr_scaling (sqrt for Adam-family optimizers, linear for SGD); a
    # linear warm-up over warmup_fraction of the fit's steps, then a cosine to zero (decay=constant: none).
    lr: float = Field(default=1e-3, gt=0)
    lr_batch: int = Field(default=64, ge=1)
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    decay: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(default=0.01, ge=0)  # AdamW's decoupled decay, on weight matrices and kernels
    # A number, or [min, max] for elastic training: the fit starts once min workers can be placed, goes on
    # with fewer after a node is lost and none replaces it, and grows back when capacity returns (checked
    # every elastic_resize_interval_s). The rate and the steps follow the world size (dlbatch/recipe.py).
    num_workers: int | tuple[int, int] = 2
    elastic_resize_interval_s: float = Field(default=60.0, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # Worker restarts allowed after a worker or node dies (-1: unlimited); the run resumes from its last checkpoint.
    max_failures: int = Field(default=2, ge=-1)
    # PACK keeps workers together; SPREAD / STRICT_SPREAD put them on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    seed: int = 0
    # Also checkpoint every N training steps inside an epoch, so a lost worker costs at most N steps rather
    # than the epoch in flight. None: at the end of each epoch only (enough when epochs take seconds).
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    # The training rows' order, drawn anew every epoch from (seed, run, epoch). global: a full random
    # shuffle of the split (Ray Data's random_shuffle), the only choice that mixes a split stored sorted by
    # label, in one file or many; files: a new file order plus a local shuffle buffer in each worker
    # (cheaper, but rows from one sorted file stay together); none: the stored order every epoch.
    shuffle: Literal["global", "files", "none"] = "global"
    # Preprocess the training and validation splits once and keep them in Ray's object store for the fit
    # (true), or stream them from Parquet every epoch (false: a split larger than the object store trains
    # with bounded memory, and training starts before preprocessing ends). auto: materialize when the
    # preprocessed splits are estimated to take at most half of the object store.
    materialize: Literal["auto"] | bool = "auto"
    # torch.compile the model for the fit: fused kernels and fewer launches per step, for GPU steps held
    # back by the host's kernel launches. Each worker compiles at the start of every fit, and on CPUs the
    # compiled steps ran slower than eager. Checkpoints hold the plain model's weights.
    compile: bool = False

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or low > high:
            raise ValueError("must be a number >= 1 or [min, max] with 1 <= min <= max")
        return value

    @property
    def max_workers(self) -> int:
        """The world size the fit is planned for: the most workers it may have."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class TextTrainConfig(TrainConfig):
    # The GRU's embedding rows learn only from the batches their tokens occur in: a higher peak rate than
    # the CNN's (chosen on real SMS text, docs/PERFORMANCE.md "Training recipe").
    lr: float = Field(default=3e-3, gt=0)


class PredictConfig(_Frozen):
    batch_size: int = Field(default=512, ge=1)
    # Inference actors (a fixed pool). None: sized to the cluster when the stage starts, one per
    # gpus_per_actor GPUs, or on CPUs one per cpus_per_actor CPUs after leaving 2 for reading and writing.
    num_actors: int | None = Field(default=None, ge=1)
    # auto: an actor pool when gpus_per_actor > 0, else Ray tasks (dlbatch/predict.py use_actors).
    compute: Literal["auto", "tasks", "actors"] = "auto"
    gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=1.0, gt=0)  # per actor, or per task in task mode
    # With an actor pool, where PNG decoding / tokenizing runs: "actor" (in the model's own process),
    # "tasks" (a stage of Ray tasks on every CPU in front of the pool, so a GPU actor only runs the model),
    # "auto": tasks when gpus_per_actor > 0. Task-mode inference always preprocesses in its own tasks.
    preprocess: Literal["auto", "actor", "tasks"] = "auto"
    # The score split is scored in parts of about this many rows (whole files; a larger file is a part of
    # its own). A finished part is kept in staging: a rerun after a killed attempt scores only the parts
    # that did not finish. Each part is one Ray Data run, so GPU actors restart between parts.
    rows_per_part: int = Field(default=1_000_000, ge=1)


class TaskConfig(_Frozen):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    # Every split's input profile (summary.json "profile") and the drift check against earlier nights;
    # off: neither (saves reading each image's pixels once more).
    profile: bool = True


class ImageTaskConfig(TaskConfig):
    image: ImageConfig = ImageConfig()
    augment: AugmentConfig = AugmentConfig()
    model: CNNConfig = CNNConfig()

    @property
    def feature_column(self) -> str:
        return self.image.column


class TextTaskConfig(TaskConfig):
    train: TextTrainConfig = TextTrainConfig()
    text: TextConfig = TextConfig()
    model: GRUConfig = GRUConfig()

    @property
    def feature_column(self) -> str:
        return self.text.column


class ClusterConfig(_Frozen):
    # None: join a running cluster if RAY_ADDRESS says so (ray job submit), else start a local one.
    address: str | None = None
    # Logical CPUs of a local cluster. Above the machine's cores on purpose: training workers each hold one,
    # and Ray Data must still get CPUs or the job hangs (the job checks it before a fit).
    local_num_cpus: int | None = None
    # Ray's dashboard for a local cluster, on 127.0.0.1 (a cluster the job joins keeps its own). On by
    # default: Ray Train's placement-group cleaner needs its state API; off starts a local run faster.
    local_dashboard: bool = True
    # Nodes for Ray Data's CPU work (reading, decoding, tokenizing: training ingest, evaluation, scoring),
    # marked with this Ray node label (`ray start --labels`). auto: when a node of the cluster carries it
    # as a stage starts, every Ray Data task runs on such nodes and the training workers and inference
    # actors on the others; with none (a laptop, a GPU-only cluster) anything runs anywhere. require: route
    # to them even before one exists (an autoscaler starts them from zero). off: never route.
    data_nodes: Literal["auto", "require", "off"] = "auto"
    data_label: str = Field(default="dlbatch-role=data", pattern=r"^[^=\s]+=[^=\s!]+$")


class TrackingConfig(_Frozen):
    # MLflow tracking server, e.g. http://mlflow.internal:5000. None: the MLFLOW_TRACKING_URI environment
    # variable, and without that no tracking at all (MLflow is not even imported).
    mlflow_uri: str | None = None
    experiment: str = "dlbatch"  # registered models are named <experiment>-<task>


class DriftConfig(_Frozen):
    # A feature whose distance to a reference night's exceeds this is drifted (dlbatch/profile.py: total
    # variation for distributions, the pixel mean's shift in standard deviations, the std's relative change).
    threshold: float = Field(default=0.2, gt=0)
    # warn: a warning in the log, the summary and the report. block: also no promotion of a model trained
    # on drifted data, no publishing of predictions for a drifted score split, and the job exits 3.
    action: Literal["warn", "block"] = "warn"


class JobConfig(_Frozen):
    tasks: tuple[Task, ...] = ("image", "text")
    output_root: str = "dlbatch-output"
    run_date: dt.date | None = None  # None: today (UTC)
    demo_rows: int = Field(default=6000, ge=100)  # training rows per demo task when data paths are empty
    max_reject_fraction: float = Field(default=0.05, ge=0, le=1)
    # A run date's published work (model, predictions, finished nightly run) is not redone unless forced;
    # force deletes that run's outputs and Ray Train checkpoints first.
    force: bool = False
    # Ray Data's per-dataset execution banners and progress lines in the job's log (hidden by default:
    # a run prints its plan, a line per stage and per epoch, and the summary). The CLI's --verbose.
    verbose: bool = False
    # A long stage (preprocessing a split, scoring, the tokenizer's training) logs a line this often, with
    # what it has done so far where that is known; 0 turns it off.
    progress_every_s: float = Field(default=60.0, ge=0)
    # Promotion gate: a new model becomes champion if its gate_metric >= champion's (same test data) - this.
    promotion_tolerance: float = Field(default=0.01, ge=0, le=1)
    # Quality floor (dlbatch/quality.py): a model must close at least this share of the gap between "always
    # the majority class" and a perfect score. Below it a model is never promoted and the night fails.
    quality_margin: float = Field(default=0.2, ge=0, lt=1)
    # The test metric of the promotion gate and the quality floor. macro_f1 or balanced_accuracy weigh
    # every class alike, so a split where one class dominates cannot flatter a model that ignores the rest.
    gate_metric: Literal["accuracy", "macro_f1", "balanced_accuracy"] = "accuracy"
    keep_versions: int = Field(default=5, ge=1)  # model versions kept per task (the champion always is)
    # Ray Train checkpoints (ray_results/<task>-<date>) kept for the newest this many run dates per task;
    # older ones are deleted once their run's model is published (an unfinished run keeps its own).
    keep_checkpoint_runs: int = Field(default=7, ge=1)
    image: ImageTaskConfig = ImageTaskConfig()
    text: TextTaskConfig = TextTaskConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    drift: DriftConfig = DriftConfig()

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError("must name each task at most once and at least one task")
        return tasks

    def task(self, name: Task) -> ImageTaskConfig | TextTaskConfig:
        return self.image if name == "image" else self.text

    def effective_run_date(self) -> dt.date:
        return self.run_date or dt.datetime.now(dt.timezone.utc).date()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "tasks=[image]"]`` into a nested dict; values are YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field's dotted path in a config model, sections included."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        paths.append(path)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths += _field_paths(field.annotation, path)
    return paths


def _did_you_mean(loc: tuple[str, ...]) -> str:
    """For an unknown key: the field of that name under the same top-level section, or anywhere
    (``image.height`` -> ``image.image.height``), else a close spelling beside it (``epoch`` -> ``epochs``)."""
    paths = _field_paths(JobConfig)
    found = [p for p in paths if p[-1] == loc[-1]]
    candidates = [p for p in found if p[0] == loc[0]] or found
    if not candidates:
        siblings = {p[-1]: p for p in paths if p[:-1] == loc[:-1]}
        candidates = [siblings[n] for n in difflib.get_close_matches(loc[-1], siblings, n=1, cutoff=0.75)]
    if not candidates or len(candidates) > 2:
        return ""
    return f"; did you mean {' or '.join('.'.join(p) for p in candidates)}?"


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    hint = _did_you_mean(tuple(str(p) for p in first["loc"])) if first["type"] == "extra_forbidden" else ""
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{hint}{more}"


def build_config(data: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        data = loaded or {}
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} + overrides"
    return build_config(data, source)


def task_config(kind: Task, saved: dict[str, Any]) -> ImageTaskConfig | TextTaskConfig:
    """A task config back from its JSON form (as saved in checkpoints and summaries)."""
    return (ImageTaskConfig if kind == "image" else TextTaskConfig).model_validate(saved)
