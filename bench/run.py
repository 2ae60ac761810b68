"""Throughput benchmark: dlbatch vs. a plain single-process PyTorch loop, same data and machine, one run.

    python bench/run.py [--infer-rows 50000] [--train-rows 6000] [--repeats 3] [--batch-size N] [--gpu]
                        [--cnn-only] [image.model.conv_channels=[128,256,256] ...]

Prints one table of ratios and writes bench/results.json. Measures:
  training samples/s (steady state: median of the epochs after the first), CNN and GRU;
  batch inference images/s end to end (Parquet with PNG bytes in -> predictions Parquet out), median of
  --repeats runs each, dlbatch and plain alternating;
  fixed cost (local cluster start, the first of --repeats starts, + fit() to the first training batch,
  median of the CNN rounds; also a fit's whole overhead);
  peak memory of inference at N and 10 N rows (RSS of the whole process tree);
  CNN FLOP/s as a fraction of this machine's fp32 matmul rate;
  on a GPU (--gpu): how busy nvidia-smi saw it over the steady epochs' training passes, each pass less the
  first ``nvidia_smi_lag`` seconds (measured at the start: how long its utilization takes to show a load).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from PIL import Image
from plain import load_split, spec_for, train_plain

from dlbatch.checkpoint import load_model
from dlbatch.config import load_config
from dlbatch.context import RunContext
from dlbatch.demo import make_image_table
from dlbatch.flow import run_predict, run_train
from dlbatch.ingest import check_data, checkpoint_meta, data_paths, learn
from dlbatch.models import fast_layout
from dlbatch.preprocess import preprocess_batch

HERE = Path(__file__).parent


def matmul_flops(
    device: str = "cpu", n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> float:
    """Measured matmul FLOP/s of the device in ``dtype`` (fp32 by default; on GPU: 8192^2, TF32 off as
    torch defaults it)."""
    if device != "cpu":
        n, repeats = 8192, 20
    a, b = (torch.rand(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def cnn_flops_per_sample(model: torch.nn.Module, shape=(1, 1, 28, 28)) -> float:
    """Forward FLOPs (2 x MACs) of convs and linears, counted with hooks on one sample."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
            total += 2 * k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.no_grad():
        model(torch.rand(shape))
    for h in handles:
        h.remove()
    return float(total)


class PeakRSS:
    """Peak resident memory of this process and all its descendants (Ray's workers included)."""

    def __init__(self, interval: float = 0.1):
        self.peak, self._stop, self.interval = 0, threading.Event(), interval
        self.processes_at_peak = 0  # more Ray workers at the peak, each with torch: more memory

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            procs = [me, *me.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            if total > self.peak:
                self.peak, self.processes_at_peak = total, len(procs)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class GpuUtilization:
    """``nvidia-smi``'s utilization.gpu every 100 ms with wall-clock stamps; no samples without a GPU."""

    def __enter__(self):
        self.samples: list[tuple[float, float]] = []
        exe = shutil.which("nvidia-smi")
        query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        self._proc = subprocess.Popen([exe, *query], stdout=subprocess.PIPE, text=True) if exe else None
        if self._proc is not None:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.time(), float(line.strip())))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._thread.join(timeout=5)

    def inside(self, windows: list[tuple[float, float]] | None = None, lag: float = 0.0) -> list[float]:
        """The samples taken inside any (start, end) window, less its first ``lag`` seconds (all samples
        without windows)."""
        return [v for t, v in self.samples if windows is None or any(a + lag <= t <= b for a, b in windows)]

    def mean(self, windows: list[tuple[float, float]] | None = None, lag: float = 0.0) -> float | None:
        """Mean utilization (%) of ``inside``; None without samples."""
        values = self.inside(windows, lag)
        return statistics.mean(values) if values else None


def nvidia_smi_lag(idle_s: float = 1.5, busy_s: float = 3.0) -> float | None:
    """Seconds from the GPU turning busy until nvidia-smi's utilization.gpu shows it (>= 90% of the
    plateau); None without a GPU or nvidia-smi, or when no sample rose.

    NVML reports the share of time a kernel ran "over the past sample period", 1/6 s to 1 s depending on
    the GPU, so a sample taken within that period of a training pass's start still counts the idle time
    before it (validation, the checkpoint, the next epoch's set-up). With epochs of about a second, as the
    H200 runs had, that pulls the mean down however busy the pass keeps the GPU. Measured here as a
    matmul load after an idle pause; the busy figures then leave each window's first ``lag`` seconds out."""
    if not (torch.cuda.is_available() and shutil.which("nvidia-smi")):
        return None
    a, b = (torch.rand(4096, 4096, device="cuda") for _ in range(2))
    a @ b  # cuBLAS's set-up, before the idle pause
    torch.cuda.synchronize()
    with GpuUtilization() as util:
        time.sleep(idle_s)  # also nvidia-smi's own start
        start = time.time()
        while time.time() - start < busy_s:
            for _ in range(8):  # ~3 ms each on an H100/H200 (fp32); a sync every 8 leaves no visible gap
                a @ b
            torch.cuda.synchronize()
        end = time.time()
    return rise_time(util.samples, start, end)


def rise_time(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Seconds after ``start`` (a load began) of the first sample at 90% of the level of the load's second
    half (up to ``end``); None if that level is under 50% (no load seen) or nothing rose."""
    plateau = [v for t, v in samples if (start + end) / 2 <= t <= end]
    if not plateau or statistics.median(plateau) < 50:
        return None
    level = 0.9 * statistics.median(plateau)
    return next((t - start for t, v in samples if start <= t <= end and v >= level), None)


def train_windows(history: list[dict]) -> list[tuple[float, float]]:
    """Wall-clock windows of the steady epochs' training passes (the first epoch's start-up left out)."""
    return [(h["train_started_at"], h["train_started_at"] + h["train_s"]) for h in history[1:]]


def busy(util: GpuUtilization, windows: list[tuple[float, float]], lag: float) -> dict:
    """GPU busy over training passes, two ways: ``pct`` without each pass's first ``lag`` seconds (see
    ``nvidia_smi_lag``; the figure reported) and ``all_samples_pct`` with them (as runs before session 15
    reported it). ``samples``: how many ``pct`` kept; a handful means epochs too short for nvidia-smi."""
    return {"pct": util.mean(windows, lag), "all_samples_pct": util.mean(windows),
            "samples": len(util.inside(windows, lag))}  # fmt: skip


def busy_summary(rounds: list[dict], prefix: str = "") -> dict:
    """One result's GPU busy fields from its rounds' ``busy`` dicts (None without a GPU)."""
    return {
        f"{prefix}gpu_utilization_pct": median_or_none([r["pct"] for r in rounds]),
        f"{prefix}gpu_utilization_all_samples_pct": median_or_none([r["all_samples_pct"] for r in rounds]),
        f"{prefix}gpu_utilization_samples_each": [r["samples"] for r in rounds],
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the rounds' GPU utilization; None when any round had none (no GPU) or without rounds."""
    return statistics.median(values) if values and None not in values else None


def steady(history: list[dict]) -> float:
    return statistics.median(h["samples_per_s"] for h in history[1:])


def bench_training(
    root: str,
    train_rows: int,
    epochs: int,
    repeats: int,
    gpus: int,
    batch_size: int | None = None,
    overrides: tuple[str, ...] = (),
    lag: float = 0.0,
    tasks: tuple[str, ...] = ("image", "text"),
) -> dict:
    """Per task, ``repeats`` rounds of dlbatch and the plain loop(s), in alternating order; medians of the
    rounds' steady-state samples/s (each round's own figure is the median of its epochs after the first).
    ``overrides`` (config ``key=value``) apply to both sides: the plain loop builds the model from the
    same data metadata. ``lag``: see ``nvidia_smi_lag``."""
    out = {}
    for task in tasks:
        extra = [f"{task}.train.use_gpu=true", f"{task}.train.num_workers={gpus}"] if gpus else []
        if batch_size:
            extra.append(f"{task}.train.batch_size={batch_size}")
        extra += [o for o in overrides if o.startswith(f"{task}.")]
        out[task] = _bench_training_task(root, task, train_rows, epochs, repeats, gpus, extra, lag)
    return out


def _bench_training_task(
    root: str, task: str, train_rows: int, epochs: int, repeats: int, gpus: int, extra: list[str], lag: float
) -> dict:
    """``bench_training`` for one task; ``extra``: its config overrides."""
    runs: dict[str, list[float]] = {"dlbatch": [], "plain": [], "plain_same_layout": [], "unshuffled": []}
    excess, stage, first_batch = [], [], []
    gpu_busy: dict[str, list[dict]] = {"": [], "plain_": [], "unshuffled_": []}  # ``busy`` per round
    # A second fit per round keeps the stored order (train.shuffle=none): what the per-epoch shuffle costs.
    # The plain loop's data, loaded once after round 0's fit wrote it (every round's demo data has the same
    # rows and seed; round 0 runs dlbatch first), and the latest fit's model (what inference scores with).
    plain_data: dict = {}
    model_dir: list[str] = []

    def fit(cfg, key: str) -> dict:
        """One dlbatch fit: its summary; the GPU's busy over its steady training passes to ``gpu_busy[key]``."""
        with GpuUtilization() as util:
            [summary] = run_train(cfg)
        gpu_busy[key].append(busy(util, train_windows(summary["history"]), lag))
        return summary

    def run_dlbatch(cfg) -> None:
        summary = fit(cfg, "")
        hist = summary["history"]
        runs["dlbatch"].append(steady(hist))
        stage.append(summary["durations_s"]["train"])
        first_batch.append(summary["durations_s"]["train_first_batch"])
        excess.append(stage[-1] - sum(h["epoch_s"] for h in hist) + (hist[0]["epoch_s"] - hist[1]["epoch_s"]))
        model_dir[:] = [summary["paths"]["model"]]
        if "train" not in plain_data:
            ctx = RunContext(cfg, task, "train")
            meta = checkpoint_meta(ctx, learn(ctx, check_data(ctx)))  # the fit's own labels and tokenizer
            paths = data_paths(ctx)
            spec = spec_for(task, meta)
            plain_data.update(meta=meta, train=load_split(paths["train"], spec),
                              val=load_split(paths["val"], spec))  # fmt: skip

    def run_unshuffled(settings: list[str]) -> None:
        # The same data (under the same output root), another run date: its own run directory.
        summary = fit(
            load_config(None, [*settings, "run_date=2026-01-02", f"{task}.train.shuffle=none"]),
            "unshuffled_",
        )
        runs["unshuffled"].append(steady(summary["history"]))

    def run_plain(cfg) -> None:
        tcfg = cfg.task(task).train
        torch.set_num_threads(os.cpu_count() or 1)
        # With dlbatch's memory layout (CNN only), the ratio against the plain loop is Ray's own cost.
        for name, channels_last in [("plain", False)] + (
            [("plain_same_layout", True)] if task == "image" else []
        ):
            with GpuUtilization() as util:
                _, plain_hist = train_plain(task, plain_data["meta"], plain_data["train"], plain_data["val"],
                                            epochs, tcfg.batch_size * tcfg.num_workers, tcfg.lr,
                                            channels_last=channels_last, device="cuda" if gpus else "cpu")  # fmt: skip
            runs[name].append(steady(plain_hist))
            if name == "plain":
                gpu_busy["plain_"].append(busy(util, train_windows(plain_hist), lag))

    for rep in range(repeats):
        settings = [f"tasks=[{task}]", f"output_root={root}/train-{task}-{rep}", f"demo_rows={train_rows}",
                    f"{task}.train.epochs={epochs}", *extra]  # fmt: skip
        cfg = load_config(None, [*settings, "run_date=2026-01-01"])
        # dlbatch first in even rounds, the plain loop first in odd ones: this shared host's speed drifts
        # within a run (up to a third in ten minutes), and a fixed order would hand one side the later slot.
        for side in (run_dlbatch, run_plain) if rep % 2 == 0 else (run_plain, run_dlbatch):
            side(cfg)
        run_unshuffled(settings)
    result = {
        "repeats": repeats,
        "dlbatch_samples_per_s": statistics.median(runs["dlbatch"]),
        "plain_samples_per_s": statistics.median(runs["plain"]),
        "plain_same_layout_samples_per_s": statistics.median(runs["plain_same_layout"])
        if runs["plain_same_layout"]
        else None,
        "all_runs": runs,
        "train_stage_s": statistics.median(stage),
        "worker_group_start_and_first_epoch_excess_s": statistics.median(excess),
        "fit_to_first_batch_s": statistics.median(first_batch),
        # GPU busy of dlbatch's fits, of the plain loop (whose batches are already decoded in memory: what
        # the model alone can keep busy) and of the fits without the shuffle (``busy_summary``).
        **{k: v for prefix, rounds in gpu_busy.items() for k, v in busy_summary(rounds, prefix).items()},
        "unshuffled_samples_per_s": statistics.median(runs["unshuffled"]),
        "model_dir": model_dir[0],
    }
    result["ratio"] = result["dlbatch_samples_per_s"] / result["plain_samples_per_s"]
    result["shuffled_vs_unshuffled"] = result["dlbatch_samples_per_s"] / result["unshuffled_samples_per_s"]
    return result


def write_score_set(path: Path, rows: int, distinct: int = 50_000) -> Path:
    """``rows`` unlabeled images in files of 5,000. Past ``distinct`` rows the generated files repeat under
    new ids: decoding costs the same, and generating 500,000 PNGs would take longer than scoring them."""
    path.mkdir(parents=True, exist_ok=True)
    chunk, made = 5000, []
    for i, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        if start < distinct:
            table = make_image_table(n, seed=1000 + i, with_labels=False, prefix=f"s{i}")
            made.append(table)
        else:
            ids = pa.array([f"s{i}-{j:07d}" for j in range(n)])
            table = made[i % len(made)].slice(0, n).set_column(0, "id", ids)
        pq.write_table(table, path / f"part-{i:04d}.parquet")
    return path


def pillow_pixels(images: pa.Array) -> np.ndarray:
    """(N, 1, H, W) float32 in [0, 1]: each PNG decoded by Pillow, as a plain loop does it."""
    data = images.field("bytes") if pa.types.is_struct(images.type) else images
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in data.to_pylist()]
    return np.stack(decoded)[:, None].astype(np.float32) * np.float32(1 / 255)


def plain_inference(
    score: Path, model_dir: str, out: Path, fast: bool = False, batch: int = 512, device: str = "cpu"
) -> float:
    """pyarrow + Pillow + torch in one process: read batches, decode, predict, write Parquet.

    ``fast``: the same loop with dlbatch's two single-process speedups (libspng PNG decoding through
    ``preprocess_batch`` and the channels_last CNN), so the ratio against it is what Ray itself adds."""
    t0 = time.perf_counter()
    model, meta = load_model(model_dir)
    model = model.to(device)
    spec = spec_for("image", meta)
    if fast:
        model = fast_layout(model)
    writer = None
    with torch.inference_mode():
        for record_batch in pads.dataset(score, format="parquet").to_batches(batch_size=batch):
            if fast:
                cols = preprocess_batch(pa.Table.from_batches([record_batch]), spec, with_labels=False)
                ids, x = cols["id"], cols["x"]
            else:
                ids, x = record_batch.column("id"), pillow_pixels(record_batch.column("image"))
            probs = torch.softmax(model(torch.from_numpy(x).to(device)), 1)
            conf, pred = (t.cpu() for t in probs.max(1))
            table = pa.table({"id": ids, "pred_index": pred.numpy(), "confidence": conf.numpy()})
            writer = writer or pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
    writer.close()
    return time.perf_counter() - t0


def bench_inference(
    root: str, model_dir: str, rows: int, actors: int | None, repeats: int, gpus: int
) -> dict:
    score = write_score_set(Path(root) / f"score-{rows}", rows)
    overrides = ["tasks=[image]", f"output_root={root}/infer", f"image.data.score={score}", "run_date=2026-01-01",
                 "force=true", *([f"image.predict.num_actors={actors}"] if actors else []),
                 *(["image.predict.gpus_per_actor=1"] if gpus else [])]  # fmt: skip
    device = "cuda" if gpus else "cpu"
    ours, plain, plain_fast, peaks, processes, gpu_util = [], [], [], [], [], []

    def run_dlbatch() -> None:
        with PeakRSS() as mem, GpuUtilization() as util:
            [summary] = run_predict(load_config(None, overrides), model=model_dir)
        ours.append(rows / summary["durations_s"]["predict"])
        peaks.append(mem.peak)
        processes.append(mem.processes_at_peak)
        gpu_util.append(util.mean())

    def run_plain() -> None:
        torch.set_num_threads(os.cpu_count() or 1)
        out = Path(root) / "plain-preds.parquet"
        plain.append(rows / plain_inference(score, model_dir, out, device=device))
        plain_fast.append(rows / plain_inference(score, model_dir, out, fast=True, device=device))

    # Alternate rounds and their order (as in training), so a drifting host hits both sides alike.
    for rep in range(repeats):
        for side in (run_dlbatch, run_plain) if rep % 2 == 0 else (run_plain, run_dlbatch):
            side()
    return {
        "rows": rows,
        "repeats": repeats,
        "dlbatch_images_per_s": statistics.median(ours),
        "plain_images_per_s": statistics.median(plain),
        "plain_same_fast_paths_images_per_s": statistics.median(plain_fast),
        "all_runs": {"dlbatch": ours, "plain": plain, "plain_same_fast_paths": plain_fast},
        "peak_rss_bytes": max(peaks),
        "peak_rss_each": peaks,
        "processes_at_peak_each": processes,
        # Over the whole scoring run, start-up included.
        "gpu_utilization_pct": median_or_none(gpu_util),
    }


def pct(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "n/a"


def save(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="training batch per worker (default: the config's)"
    )
    parser.add_argument("--infer-rows", type=int, default=50_000)
    parser.add_argument(
        "--actors", type=int, default=None, help="inference actors (default: sized to the cluster)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per side, training and inference (medians reported)"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="train on every GPU (one worker each), score with one actor per GPU",
    )
    parser.add_argument(
        "--cnn-only",
        action="store_true",
        help="train the CNN only, not the GRU (the GPU target's task, in half the device time)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for training, both sides (image.* or text.*), e.g. a CNN with more work per "
        "sample: image.model.conv_channels=[128,256,256] image.model.hidden=512",
    )
    args = parser.parse_args()
    for override in args.overrides:
        if "=" not in override or not override.startswith(("image.", "text.")):
            parser.error(f"{override!r}: expected image.<key>=<value> or text.<key>=<value>")
    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and not gpus:
        parser.error("--gpu: torch sees no CUDA device")

    import ray

    from dlbatch.cluster import ensure_ray

    root = tempfile.mkdtemp(prefix="dlbatch-bench-")
    # Ray start, --repeats times (the benchmark runs on the last cluster started). The fixed cost counts
    # the first: a job starts Ray once, and the first start in a process was ~1 s slower than the later
    # ones (6.5 / 5.6 / 5.7 s), which reuse what the first loaded. The others show the spread.
    ray_starts = []
    for attempt in range(args.repeats):
        if attempt:
            ray.shutdown()
            time.sleep(2)  # let the previous cluster's processes exit before timing the next start
        t0 = time.perf_counter()
        ensure_ray(load_config(None, []))
        ray_starts.append(time.perf_counter() - t0)
    ray_start_s = ray_starts[0]
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        # Otherwise the fit would wait forever for a GPU placement group.
        parser.error(f"--gpu: torch sees {gpus} GPU(s), the local Ray cluster {ray.cluster_resources()}")
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}}
    if gpus:
        results["machine"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
    results["overrides"] = args.overrides
    lag = nvidia_smi_lag() if gpus else None
    if gpus:
        results["machine"]["nvidia_smi_lag_s"] = lag
        print(f"nvidia-smi's utilization lags the GPU by {lag:.2f} s: GPU busy leaves each training pass's "
              "first that long out" if lag is not None else
              "nvidia-smi's lag could not be measured: GPU busy counts every sample", flush=True)  # fmt: skip
    tasks = ("image",) if args.cnn_only else ("image", "text")
    results["training"] = bench_training(
        root, args.train_rows, args.epochs, args.repeats, gpus, args.batch_size, tuple(args.overrides),
        lag or 0.0, tasks,
    )  # fmt: skip
    save(results)  # what is measured so far survives a later stage that fails
    for task, r in results["training"].items():
        print(f"[{task}] training: dlbatch {r['dlbatch_samples_per_s']:,.0f} samples/s, plain "
              f"{r['plain_samples_per_s']:,.0f}", flush=True)  # fmt: skip
        print(f"[{task}] training without the per-epoch shuffle (train.shuffle=none): "
              f"{r['unshuffled_samples_per_s']:,.0f} samples/s; shuffled/unshuffled "
              f"{r['shuffled_vs_unshuffled']:.2f}", flush=True)  # fmt: skip
        if gpus:
            for who, prefix in (("dlbatch", ""), ("unshuffled", "unshuffled_"), ("plain", "plain_")):
                print(f"[{task}] GPU busy, {who}: {pct(r[prefix + 'gpu_utilization_pct'])} (every sample in "
                      f"the passes: {pct(r[prefix + 'gpu_utilization_all_samples_pct'])}; samples kept per "
                      f"round: {r[prefix + 'gpu_utilization_samples_each']})", flush=True)  # fmt: skip
    model_dir = results["training"]["image"]["model_dir"]
    # As many rounds for N as for 10N: the memory ratio compares the highest peak of each, and a peak is
    # a sample every 0.1 s, so one round of N against three of 10N would favour 10N's side.
    small = bench_inference(root, model_dir, args.infer_rows // 10, args.actors, args.repeats, gpus)
    large = bench_inference(root, model_dir, args.infer_rows, args.actors, args.repeats, gpus)
    results["inference"] = {
        **large,
        "ratio": large["dlbatch_images_per_s"] / large["plain_images_per_s"],
        "ratio_same_fast_paths": large["dlbatch_images_per_s"] / large["plain_same_fast_paths_images_per_s"],
    }
    results["memory"] = {"peak_rss_n": small["peak_rss_bytes"], "peak_rss_10n": large["peak_rss_bytes"],
                         "ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"],
                         "peak_rss_n_each": small["peak_rss_each"], "peak_rss_10n_each": large["peak_rss_each"],
                         "processes_at_peak_n_each": small["processes_at_peak_each"],
                         "processes_at_peak_10n_each": large["processes_at_peak_each"]}  # fmt: skip
    image = results["training"]["image"]
    results["fixed_cost_s"] = {
        "ray_start": ray_start_s,  # the first start in this process, as a job pays it
        "ray_start_each": ray_starts,
        # fit() to the first training batch: controller, worker group, process group, model, dataset shards.
        "worker_group_and_first_batch": image["fit_to_first_batch_s"],
        "total": ray_start_s + image["fit_to_first_batch_s"],
        # Everything a fit costs beyond its steady epochs (also the slower first epoch and the teardown).
        "fit_overhead_beyond_steady_epochs": image["worker_group_start_and_first_epoch_excess_s"],
    }
    model, _ = load_model(model_dir)
    flops = cnn_flops_per_sample(model)
    peak = matmul_flops("cuda" if gpus else "cpu")
    results["flops"] = {
        "cnn_forward_flops_per_sample": flops,
        "machine_fp32_matmul_flops": peak,
        "train_fraction": 3 * flops * image["dlbatch_samples_per_s"] / peak,
        "inference_fraction": flops * large["dlbatch_images_per_s"] / peak,
    }
    if gpus:
        # dlbatch trains and scores in bf16 on a GPU (autocast), so its fraction of the fp32 rate can pass
        # 100%; against the bf16 rate it says how much of the tensor cores the CNN's small convs use.
        bf16 = matmul_flops("cuda", dtype=torch.bfloat16)
        results["flops"].update(
            machine_bf16_matmul_flops=bf16,
            train_fraction_of_bf16=3 * flops * image["dlbatch_samples_per_s"] / bf16,
            inference_fraction_of_bf16=flops * large["dlbatch_images_per_s"] / bf16,
        )
    save(results)
    text = results["training"].get("text")  # None with --cnn-only
    rows = [
        ("CNN training samples/s", image["dlbatch_samples_per_s"], image["plain_samples_per_s"], image["ratio"],
         image["all_runs"], "plain"),
        ("  vs plain in dlbatch's layout", image["dlbatch_samples_per_s"], image["plain_same_layout_samples_per_s"],
         image["dlbatch_samples_per_s"] / image["plain_same_layout_samples_per_s"], image["all_runs"],
         "plain_same_layout"),
        *([("GRU training samples/s", text["dlbatch_samples_per_s"], text["plain_samples_per_s"], text["ratio"],
            text["all_runs"], "plain")] if text else []),
        *[(f"  {t} shuffled vs train.shuffle=none", r["dlbatch_samples_per_s"], r["unshuffled_samples_per_s"],
           r["shuffled_vs_unshuffled"], r["all_runs"], "unshuffled") for t, r in results["training"].items()],
        (f"inference images/s ({args.infer_rows:,})", large["dlbatch_images_per_s"], large["plain_images_per_s"],
         results["inference"]["ratio"], large["all_runs"], "plain"),
        ("  vs plain with the same fast paths", large["dlbatch_images_per_s"],
         large["plain_same_fast_paths_images_per_s"], results["inference"]["ratio_same_fast_paths"],
         large["all_runs"], "plain_same_fast_paths"),
    ]  # fmt: skip
    # Each round's own ratio too: its two sides ran minutes apart, so a host whose speed drifts during the run
    # moves them together. The ratio column is the ratio of the medians.
    print(f"{'metric':34} {'dlbatch':>10} {'plain':>10} {'ratio':>7}  each round")
    for name, ours, base, ratio, runs, baseline in rows:
        each = " / ".join(f"{a / b:.2f}" for a, b in zip(runs["dlbatch"], runs[baseline], strict=True))
        print(f"{name:34} {ours:10,.0f} {base:10,.0f} {ratio:7.2f}  {each}")
    mem = results["memory"]
    print(
        f"peak RSS N={args.infer_rows // 10:,}: {mem['peak_rss_n'] / 2**20:,.0f} MiB, 10N: {mem['peak_rss_10n'] / 2**20:,.0f} MiB, ratio {mem['ratio']:.2f}"
        f" (each round: N {' / '.join(f'{b / 2**20:,.0f}' for b in mem['peak_rss_n_each'])},"
        f" 10N {' / '.join(f'{b / 2**20:,.0f}' for b in mem['peak_rss_10n_each'])} MiB; processes at the peak:"
        f" N {mem['processes_at_peak_n_each']}, 10N {mem['processes_at_peak_10n_each']})"
    )
    fixed = results["fixed_cost_s"]
    print(
        f"fixed cost: {fixed['total']:.1f} s = Ray start {ray_start_s:.1f} s (the first of {' / '.join(f'{t:.1f}' for t in ray_starts)}) + fit() to first batch {fixed['worker_group_and_first_batch']:.1f} s"
        f" (a fit's whole overhead beyond steady epochs, teardown included: {fixed['fit_overhead_beyond_steady_epochs']:.1f} s)"
    )
    if gpus:
        gru = (
            f", GRU {pct(text['gpu_utilization_pct'])} (plain {pct(text['plain_gpu_utilization_pct'])})"
            if text
            else ""
        )
        print(f"GPU utilization: training CNN {pct(image['gpu_utilization_pct'])} (plain "
              f"{pct(image['plain_gpu_utilization_pct'])}){gru} (steady epochs' training passes, each less its "
              f"first {lag or 0:.2f} s); inference {pct(large['gpu_utilization_pct'])} (whole run)")  # fmt: skip
    print(
        f"CNN FLOP/s fraction of fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s): train {results['flops']['train_fraction']:.1%}, inference {results['flops']['inference_fraction']:.1%}"
    )
    if gpus:
        f = results["flops"]
        print(
            f"... of bf16 matmul peak ({f['machine_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, what dlbatch's bf16 autocast runs on): train {f['train_fraction_of_bf16']:.1%}, inference {f['inference_fraction_of_bf16']:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
