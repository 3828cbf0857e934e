"""The GPU check script's CPU parts, here where there is no GPU: it must run up to its
GPU calls, so a lent device's minutes are not spent on its bugs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_parts_and_skips_the_gpu_ones(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    for step in ("amp_bf16", "ray_train_1_worker_gloo"):
        assert "error" not in result[step], result[step]
        assert result[step]["macro_f1"] > 0.3 and result[step]["seconds"] > 0  # it trained (chance: 0.1)
    assert result["amp_bf16"]["precision"] == "bf16"
    for step in ("amp_fp16_gradscaler", "gpu_utilisation", "tensorrt"):
        assert result[step] == {"skipped": "no CUDA device"}


def test_gpu_check_refuses_to_run_without_cuda_unless_told(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "x.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pass --cpu" in done.stderr
    assert not (tmp_path / "x.json").exists()
