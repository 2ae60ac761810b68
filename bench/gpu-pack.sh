#!/usr/bin/env bash
# Packs what a GPU benchmark run needs on a machine with no network and no Ray (Python 3.12 with torch,
# pyarrow, pandas, numpy, Pillow): the team's stripped Ray (../shared/gpu/pack-ray.sh) plus dlbatch's own
# dependencies that such an image lacks. Everything lands in .gpu/ (git-ignored); run from the repo root:
#   bash bench/gpu-pack.sh
# then start the device command with the line pack-ray.sh prints (it installs .gpu/*.whl too), e.g.
#   <that line> python3 bench/run.py --gpu --repeats 1 2>&1 | tail -30; cp bench/results.json "$OUT/"
set -euo pipefail
root=$(git rev-parse --show-toplevel)
bash "$root/../shared/gpu/pack-ray.sh"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in pyyaml psutil pyspng; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$root/.gpu" "$p"
done
du -sh "$root/.gpu"
