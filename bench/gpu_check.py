"""The checks a lent GPU machine runs once (``bench/gpu_check.sh`` installs, then runs
this): AMP bf16 and fp16 trials, a 1-GPU Ray Train trial over NCCL, GPU utilisation and
memory sampled during a trial, and the TensorRT engine's build, parity and latency. It
writes one JSON (``--out``).

Each step records its numbers or its error and the next step still runs: a device's
minutes are too scarce to lose the rest to one failure. On a machine without CUDA,
``--cpu`` runs the same steps on the CPU where they can run (bf16 autocast, a gloo Ray
Train trial, the ONNX export) and records the GPU-only ones as skipped, so the script
is known to work up to its GPU calls (``tests/test_gpu_check.py``).

    python -m bench.gpu_check --out gpu_check.json [--cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

UTIL_TARGET = 90.0  # % of samples' mean GPU utilisation during the busiest trial
# The CPU check trains on the first 100 digits of each class (1,000 of 1,797; 800 to train):
# it checks that the paths run and learn, not how well. The GPU check trains on all.
CPU_IMAGES_PER_CLASS = 100


class GpuSampler:
    """GPU 0's utilisation % and memory MiB every ``period_s`` while running (NVML, else ``nvidia-smi``)."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.source = "none"
        self.samples: list[tuple[float, float]] = []
        self.unreadable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:  # NVML (nvidia-ml-py) reads in microseconds; an nvidia-smi process takes about a second
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - no NVML binding or library: fall back to the CLI
            def read() -> tuple[float, float]:
                done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits", "--id=0"], capture_output=True, text=True,
                                      timeout=10)
                util, mem = (float(v) for v in done.stdout.strip().split(","))  # "[N/A]" under MIG: skipped
                return util, mem
            self.source = "nvidia-smi"
        while not self._stop.is_set():
            try:
                self.samples.append(read())
            except Exception:  # noqa: BLE001 - counted: a sample that could not be read
                self.unreadable += 1
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": 0, "unreadable": self.unreadable}
        util = [u for u, _ in self.samples]
        return {"samples": len(util), "util_mean_pct": float(np.mean(util)), "util_p50_pct": float(np.median(util)),
                "busy_share": float(np.mean([u >= UTIL_TARGET for u in util])),
                "memory_max_mib": max(m for _, m in self.samples), "target_util_pct": UTIL_TARGET,
                "target_met": float(np.mean(util)) >= UTIL_TARGET, "unreadable": self.unreadable, "source": self.source,
                # Sampled over the whole `train()`: the scan, set-up and evaluation lower the mean.
                "covers": "the whole training run, set-up and evaluation included"}


def _step(results: dict, name: str, fn: Callable[[], dict], skip: str | None = None) -> None:
    """Run one check into ``results[name]``: its numbers, ``skipped`` or ``error``."""
    if skip:
        results[name] = {"skipped": skip}
        print(f"[{name}] skipped: {skip}", flush=True)
        return
    start = time.time()
    try:
        results[name] = {**fn(), "seconds": round(time.time() - start, 1)}
        print(f"[{name}] ok: {json.dumps(results[name])[:400]}", flush=True)
    except Exception as err:  # noqa: BLE001 - recorded; the other checks still run
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:],
                         "seconds": round(time.time() - start, 1)}
        print(f"[{name}] FAILED: {err}", flush=True)


def _train(work: Path, data: Path, name: str, *, gpu: bool, precision: str, backbone: str = "resnet10t",
           image_size: int = 32, epochs: int = 2, batch_size: int = 64, num_workers: int = 0,
           loader_workers: int = 2, sampler: bool = False) -> dict:
    """One ``tunecv train`` run (in-process, or a Ray Train worker group); its last epoch."""
    from search.config import parse_config
    from search.jobs.train import train

    cfg = parse_config({
        "name": name, "output_dir": str(work / "runs"),
        "data": {"root": str(data), "image_size": image_size, "num_workers": loader_workers},
        "model": {"backbone": backbone, "pretrained": False},
        "optim": {"epochs": epochs, "batch_size": batch_size, "lr_head": 3e-3, "lr_base": 3e-3,
                  "warmup_epochs": 0.2, "precision": precision},
        "scaling": {"num_workers": num_workers, "use_gpu": gpu, "cpus_per_worker": 1},
    })
    from trainables.data.split_files import read_split

    start = time.perf_counter()
    with GpuSampler() as gpu_samples:
        run_dir = train(cfg, print_fn=lambda *_: None)
    seconds = time.perf_counter() - start
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    out = {"run_dir": str(run_dir), "macro_f1": meta["metrics"]["macro_f1"], "precision": precision,
           "backbone": backbone, "image_size": image_size, "workers": num_workers}
    if sampler:
        images = epochs * len(read_split(str(run_dir / "split.parquet")).train)
        # Set-up and evaluation included: a lower bound on the training loop's own rate.
        out["gpu"] = {**gpu_samples.summary(), "train_images_per_s_overall": round(images / seconds, 1)}
    return out


def _step_ceiling(backbone: str, image_size: int, batch_size: int, steps: int = 30) -> dict:
    """Images/s of bare bf16 training steps on one GPU-resident batch: what the GPU can
    take when nothing waits on data, to set beside the loader-fed trial's rate."""
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=10).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device="cuda")

    def one_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        one_step()
    torch.cuda.synchronize()
    with GpuSampler(period_s=0.05) as gpu_samples:
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
            "images_per_s": round(steps * batch_size / seconds, 1),
            "util_mean_pct": gpu_samples.summary().get("util_mean_pct")}


def _tensorrt(run_dir: Path) -> dict:
    """Engine build and parity through the export, then latency of eager fp32, ORT CUDA
    (when onnxruntime-gpu is installed) and the engine, at batch 1 and 32."""
    import onnxruntime as ort

    from search.export.onnx import export_checkpoint
    from search.export.tensorrt import build_engine
    from trainables.model.checkpoint import load_model
    from trainables.data.split_files import read_split

    checkpoint = run_dir / "best"
    with tempfile.TemporaryDirectory() as tmp:
        result = export_checkpoint(checkpoint, read_split(str(run_dir / "split.parquet")), Path(tmp) / "export",
                                   tensorrt=True)
        onnx_path = result.onnx_path
        model, meta = load_model(checkpoint)
        size = meta["preprocessing"]["image_size"]
        model = model.cuda().eval()
        engine, precision, version = build_engine(onnx_path, "input", size, 32)
        context = engine.create_execution_context()
        session = None
        if "CUDAExecutionProvider" in ort.get_available_providers():
            session = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
            if session.get_providers()[0] != "CUDAExecutionProvider":  # its CUDA libraries did not load
                session = None
        cuda_ort = session is not None
        latency = []
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, device="cuda")
            out = torch.empty((batch, len(meta["class_names"])), device="cuda")
            context.set_input_shape("input", tuple(x.shape))
            context.set_tensor_address("input", x.data_ptr())
            context.set_tensor_address("logits", out.data_ptr())
            stream = torch.cuda.current_stream().cuda_stream
            runners = {"eager_fp32_ms": lambda: model(x),
                       "tensorrt_ms": lambda: context.execute_async_v3(stream)}
            if session is not None:  # from host memory and back, as a plain ORT client serves
                host = x.cpu().numpy()
                runners["ort_cuda_with_copies_ms"] = lambda: session.run(["logits"], {"input": host})
            row = {"batch": batch}
            with torch.inference_mode():
                for name, fn in runners.items():
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(30):
                        start = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                    row[name] = 1000 * float(np.median(times))
            latency.append(row)
    return {"parity": result.tensorrt, "onnx_macro_f1": result.onnx_macro_f1, "engine_precision": precision,
            "tensorrt_version": version, "ort_cuda": cuda_ort, "latency": latency}


def _keep_first(root: Path, per_class: int) -> None:
    """Delete all but the first ``per_class`` images of each class folder under ``root``."""
    for class_dir in root.iterdir():
        for extra in sorted(class_dir.iterdir())[per_class:]:
            extra.unlink()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--cpu", action="store_true", help="no CUDA here: run the CPU parts, skip the GPU ones")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        parser.error("CUDA is not available; pass --cpu to run the CPU parts only.")
    from search.export.int8 import cpu_int8_flags
    from trainables.data.demo_data import write_digits

    from bench._common import commit

    results: dict[str, Any] = {
        # A device gets the working tree without .git ("unknown"): whoever commits the
        # result names the commit whose tree it ran.
        "commit": commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_int8_flags": cpu_int8_flags(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    no_gpu = None if cuda else "no CUDA device"
    gpu = cuda
    no_ray = None if importlib.util.find_spec("ray") else "ray is not installed here (carry its wheel)"
    from search.export.tensorrt import tensorrt_unavailable_reason

    no_trt = no_gpu or tensorrt_unavailable_reason()
    with tempfile.TemporaryDirectory(prefix="tunecv-gpu-check-") as tmp:
        work = Path(tmp)
        write_digits(work / "digits32", image_size=32)
        # Without AVX512-BF16 torch runs bf16 convolutions on the CPU through its slow
        # reference kernel (7.8 s a resnet10t step, 22x fp32): the CPU check of this path
        # trains timm's tiny test_resnet at 32 px instead, at batch 32 on 100 images a class
        # (all 1,797 at batch 64 took 55.6 s on an AMD EPYC, 1.2 s a step; now 31 s). At 16 px its
        # last stage is 1x1 and bf16 BatchNorm gradients there reach 1e30 by step 2 (nan at
        # any learning rate, torch 2.14.1 on the CPU); 24 and 32 px learn (macro-F1 0.75 on
        # all 1,797, 0.58 on the 1,000 here).
        # The CPU check's Ray Train step takes it too: it checks the gloo path, and resnet10t
        # made it the check's longest step (63 s of 78 here, against test_resnet's ~10 s).
        cpu_model = {} if cuda else {"backbone": "test_resnet", "image_size": 32, "batch_size": 32}
        if not cuda:
            _keep_first(work / "digits32", CPU_IMAGES_PER_CLASS)
        _step(results, "amp_bf16", lambda: _train(work, work / "digits32", "bf16", gpu=gpu, precision="bf16",
                                                   **cpu_model))
        _step(results, "amp_fp16_gradscaler",
              lambda: _train(work, work / "digits32", "fp16", gpu=gpu, precision="fp16"), skip=no_gpu)
        _step(results, "ray_train_1_worker" + ("_nccl" if cuda else "_gloo"),
              lambda: _train(work, work / "digits32", "ddp", gpu=gpu, precision="bf16" if cuda else "fp32",
                             num_workers=1, **cpu_model), skip=no_ray)
        if cuda:  # the busiest trial: resnet50 at 128 px, bf16, 8 loader processes, 10 epochs
            write_digits(work / "digits128", image_size=128)
        _step(results, "gpu_utilisation",
              lambda: _train(work, work / "digits128", "util", gpu=True, precision="bf16", backbone="resnet50",
                             image_size=128, epochs=10, batch_size=128, loader_workers=8, sampler=True),
              skip=no_gpu)
        _step(results, "train_step_ceiling", lambda: _step_ceiling("resnet50", 128, 128), skip=no_gpu)
        trained = results.get("amp_bf16", {}).get("run_dir")
        _step(results, "tensorrt", lambda: _tensorrt(Path(trained)),
              skip=no_trt or (None if trained else "the bf16 trial gave no checkpoint"))
    if not no_ray:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    for step in results.values():
        if isinstance(step, dict):
            step.pop("run_dir", None)  # a temporary directory, gone by now
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
