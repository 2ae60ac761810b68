#!/usr/bin/env bash
# The GPU benchmark on a machine with no network and no Ray (after bench/gpu-pack.sh filled .gpu/ here):
#   bash bench/gpu-run.sh [bench/run.py options]
# Installs .gpu/ under /tmp/site, checks the imports and the GPU, runs bench/train_step.py and then
# bench/run.py --gpu, and leaves the log, results.json and train_step.json in $OUT (default
# bench/gpu-out/). Each step prints before it starts, so a run cut short still says how far it got.
set -uo pipefail
out=${OUT:-$PWD/bench/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
step() { echo "== $(date +%T) $*"; }

step install
mkdir -p /tmp/site && tar xJf .gpu/ray-site.tar.xz -C /tmp/site &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
# The stripped Ray has no dashboard web client, but the dashboard's HTTP server needs its folder to exist.
mkdir -p /tmp/site/ray/dashboard/client/build/static
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

step check
nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv
nproc; free -g | head -2
python3 -m pip list 2>/dev/null | grep -iE "^(torch|numpy|pyarrow|pandas|protobuf|pillow) "
python3 -c "import ray, ray.data, ray.train, torch, pyspng, tokenizers
print('ray', ray.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
# The dashboard's packages were carried; if they do not import here, hide one so that dlbatch starts its
# local cluster without the dashboard (it says so) instead of failing.
if ! python3 -c "import ray.dashboard.optional_deps, ray._private.metrics_agent"; then
  echo "dashboard packages do not import here: running without the dashboard"
  rm -rf /tmp/site/opencensus /tmp/site/opencensus-*
fi

step train-step
# First, as it is short: the CNN's training step alone in the variants a GPU fit could run it
# (bench/train_step.py: ~5 s for nvidia-smi's lag, six variants of ~4 s each, then torch.compile's
# compilation; never yet timed on a GPU machine), so a benchmark cut short does not lose it.
timeout "${STEP_TIMEOUT:-150}" python3 bench/train_step.py
cp bench/train_step.json "$out/" 2>/dev/null

step bench
rm -f bench/results.json  # the committed CPU results must not pass for this run's
# The benchmark saves results.json after training too, so a timeout in inference keeps the training figures.
timeout "${BENCH_TIMEOUT:-420}" python3 bench/run.py --gpu --repeats 1 "$@"
echo "bench exit code $?"
cp bench/results.json "$out/" 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
step done
