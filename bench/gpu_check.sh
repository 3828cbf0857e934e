#!/usr/bin/env bash
# The one script a lent GPU machine runs (well under 8 minutes), from the repository root:
#   bash bench/gpu_check.sh
# The lent machine reaches no package registry, and its image's python3 already holds
# torch (CUDA), timm, onnx, onnxruntime, pyarrow, scikit-learn and OpenCV. What it lacks
# travels as wheels in .gpu-wheels/ (made here by bench/gpu_wheels.sh; name it in the
# device call's `carry`) and is installed from there alone. Steps whose packages are
# still missing (Ray, whose cp312 wheel is 79 MB, TensorRT, ONNX Runtime's CUDA build: too large to carry) are
# recorded as skipped in the JSON, which goes to $OUT (the device tool's folder) or
# bench/results/.
set -euo pipefail
out_dir="${OUT:-bench/results}"
start=$(date +%s)
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "ready in $(( $(date +%s) - start )) s"
PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out "$out_dir/gpu_check.json"
echo "done in $(( $(date +%s) - start )) s"
