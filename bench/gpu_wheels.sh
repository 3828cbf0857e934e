#!/usr/bin/env bash
# Wheels for the lent GPU machine's Python 3.12 (x86-64) that its image lacks and
# tunecv's in-process trial and export need: pydantic and albumentations with their
# compiled helpers, and Ray (train, tune) with the few of its needs the image lacks.
# A device call carries 64 MiB at most and Ray's cp312 wheel is 79 MB, so the wheel is
# cut in two: `.gpu-wheels-ray/` holds its second half and travels first, parked on the
# warm machine's /tmp by a call of its own (the next call removes it from the tree); `.gpu-wheels/` holds the rest and travels with the
# call that runs bench/gpu_check.sh, which joins the halves (docs/benchmarks.md, "GPU check"):
#   run(carry=[".gpu-wheels-ray"], command="cp -r .gpu-wheels-ray /tmp/")
#   run(carry=[".gpu-wheels"], command="bash bench/gpu_check.sh")   # within 30 s
# TensorRT (over 1 GB) cannot travel.
set -euo pipefail
for dir in /.gpu-wheels/ /.gpu-wheels-ray/; do
  grep -qx "$dir" .git/info/exclude 2>/dev/null || echo "$dir" >> .git/info/exclude
done
# The versions this checkout's environment runs (albumentations pins albucore exactly).
pins=$("${PYTHON:-.venv/bin/python}" -m pip list --format=freeze 2>/dev/null | grep -iE \
  '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|albumentations|albucore|simsimd|stringzilla|ray|jsonschema|jsonschema[-_]specifications|referencing|rpds[-_]py|tensorboardx)==')
rm -rf .gpu-wheels .gpu-wheels-ray
python -m pip download -q --dest .gpu-wheels --only-binary=:all: --no-deps \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 $pins
mkdir .gpu-wheels-ray
ray=$(ls .gpu-wheels/ray-*.whl)
split -n 2 -d "$ray" "$ray.part-"  # part-00 stays, part-01 travels first
mv "$ray.part-01" .gpu-wheels-ray/
rm "$ray"
du -sh .gpu-wheels .gpu-wheels-ray
