#!/usr/bin/env bash
# Packs what a GPU benchmark run needs on a machine with no network and no Ray (Python 3.12 with torch,
# pyarrow, pandas, numpy, Pillow): the team's stripped Ray (../shared/gpu/pack-ray.sh) plus dlbatch's own
# dependencies that such an image lacks. Everything lands in .gpu/ (git-ignored); run from the repo root:
#   bash bench/gpu-pack.sh
# then run bench/gpu-run.sh on the GPU machine (it installs .gpu/ and runs the benchmark there).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
bash "$root/../shared/gpu/pack-ray.sh"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# The dashboard's packages (ray[default]) that the image lacks; without them a local cluster starts without
# the dashboard (dlbatch/cluster.py says so in one line). Checked against the image's package list.
dash=(aiohttp-cors colorful smart-open opencensus opencensus-context google-api-core google-auth
  googleapis-common-protos proto-plus pyasn1 pyasn1-modules cryptography cffi pycparser opentelemetry-api
  opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-exporter-prometheus opentelemetry-proto)
for p in pyyaml psutil pyspng tokenizers tqdm "${dash[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$root/.gpu" "$p"
done
du -sh "$root/.gpu"
