#!/usr/bin/env bash
# Wheels for the lent GPU machine's Python 3.12 (x86-64) that its image lacks and
# tunecv's in-process trial and export need: pydantic and albumentations with their
# compiled helpers. Run here, from the repository root, before a device call that runs
# bench/gpu_check.sh with `carry: [".gpu-wheels"]` (a few MB; the call carries 64 MiB
# at most, so Ray's 79 MB wheel and TensorRT cannot go with it).
set -euo pipefail
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
# The versions this checkout's environment runs (albumentations pins albucore exactly).
pins=$(python -m pip list --format=freeze 2>/dev/null | grep -iE \
  '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|albumentations|albucore|simsimd|stringzilla)==')
rm -rf .gpu-wheels
python -m pip download -q --dest .gpu-wheels --only-binary=:all: --no-deps \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 $pins
du -sh .gpu-wheels
