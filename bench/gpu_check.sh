#!/usr/bin/env bash
# The one script a lent GPU machine runs (well under 8 minutes), from the repository root:
#   bash bench/gpu_check.sh
# The lent machine reaches no package registry, and its image's python3 already holds
# torch (CUDA), timm, onnx, onnxruntime, pyarrow, scikit-learn and OpenCV. What it lacks
# travels as wheels in .gpu-wheels/ (made here by bench/gpu_wheels.sh; name it in the
# device call's `carry`) and is installed from there alone. Ray's wheel travels in two
# halves (.gpu-wheels-ray/ parked by an earlier call; see bench/gpu_wheels.sh), joined
# here. Steps whose packages are still missing (TensorRT, ONNX Runtime's CUDA build: too
# large to carry; Ray when its halves are not both here) are recorded as skipped in the
# JSON, which goes to $OUT (the device tool's folder) or bench/results/.
set -euo pipefail
out_dir="${OUT:-bench/results}"
start=$(date +%s)
parts=(.gpu-wheels/ray-*.whl.part-* /tmp/.gpu-wheels-ray/ray-*.whl.part-*)
if [ "${#parts[@]}" = 2 ] && [ -f "${parts[0]}" ] && [ -f "${parts[1]}" ]; then
  whole="/tmp/$(basename "${parts[0]%.part-*}")"
  cat "${parts[@]}" > "$whole" && python3 -m pip install -q --no-index --no-deps "$whole"
else
  echo "Ray's wheel is not here in both halves: the Ray Train step will be skipped"
fi
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "ready in $(( $(date +%s) - start )) s"
PYTHONPATH="$PWD" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out "$out_dir/gpu_check.json"
echo "done in $(( $(date +%s) - start )) s"
