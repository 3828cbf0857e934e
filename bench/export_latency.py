"""CPU latency of PyTorch eager, ONNX Runtime fp32 and ONNX Runtime static int8, side by side.

A benchmark, not a test: it exports each model (a checkpoint, or by default randomly
initialised resnet10t at 64 px, efficientnet_b0 and resnet50 at 224 px, 10 classes) with
``search.export.onnx.export_onnx``, quantizes it with ``search.export.int8.quantize_int8``
(QDQ, per-channel; calibrated on random inputs, which sets the scales but not the speed),
and times the three at batch 1 and 32 with the same thread count (``torch.get_num_threads()``
or ``--threads``, ONNX Runtime's ``intra_op_num_threads`` set equal). Accuracy is measured
apart, on real data: a resnet10t trained 3 epochs on the digits, exported with the int8
gate (``--no-accuracy`` skips it). Targets: ORT fp32 <= 0.5x eager, int8 <= 0.3x eager with
<= 0.5 macro-F1 points lost; the result says which were met, with the CPU's int8 flags.
Each timed run alternates the runtimes, so all see the same machine load;
on a busy machine torch's OpenMP threads wait on each other, so eager suffers far more than
ONNX Runtime (measured here: resnet10t batch 1, 2 threads, one core taken: 384 ms vs 4.5 ms
at 1 thread), and the table warns when the load average says the CPUs were not free.
It writes ``bench/results/export_latency.json`` and prints a table. Before it writes, it
checks what it measured: both batch sizes timed, every time above zero, and the two
runtimes' logits within ``MAX_LOGIT_DIFF`` (a wrong export would time the wrong model);
otherwise it raises ``BenchError``. ``search.export.onnx.export_checkpoint`` is what
verifies accuracy on real data.

    .venv/bin/python -m bench.export_latency [--checkpoint DIR] [--runs 30] [--threads N]
    .venv/bin/python -m bench.export_latency --smoke --results DIR   # resnet10t, 3 runs at 32 px (tests)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import RESULTS, BenchError, write_result

BATCH_SIZES = (1, 32)
MODELS = (("resnet10t", 64), ("efficientnet_b0", 224), ("resnet50", 224))
SMOKE_MODELS = (("resnet10t", 32),)
DEFAULT_NUM_CLASSES = 10
MAX_LOGIT_DIFF = 1e-3  # fp32 export; measured differences are about 1e-7
TARGETS = {"ort_over_eager": 0.5, "int8_over_eager": 0.3, "int8_drop_points": 0.5}


def _load(checkpoint: Path | None, backbone: str, image_size: int) -> tuple[torch.nn.Module, str, int]:
    """(eval-mode model, backbone name, image size): the checkpoint's, or ``backbone`` at random init."""
    if checkpoint is not None:
        from trainables.model.checkpoint import load_model

        model, meta = load_model(checkpoint)
        return model, meta["backbone"], int(meta["preprocessing"]["image_size"])
    import timm

    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=DEFAULT_NUM_CLASSES)
    return model.eval(), backbone, image_size


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in seconds)
    return {
        "median": statistics.median(ms),
        "p10": float(np.percentile(ms, 10)),
        "p90": float(np.percentile(ms, 90)),
        "min": ms[0],
    }


@torch.inference_mode()
def _time_batch(model, session, int8_session, batch: int, image_size: int, runs: int, warmup: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    feed = {"input": x.numpy()}
    max_diff = float(np.abs(model(x).numpy() - session.run(["logits"], feed)[0]).max())
    runners = {"eager_ms": lambda: model(x), "onnxruntime_ms": lambda: session.run(["logits"], feed),
               "int8_ms": lambda: int8_session.run(["logits"], feed)}
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):  # alternate, so a load spike hits every runtime alike
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: _summary_ms(t) for name, t in times.items()}
    return {
        "batch": batch,
        **ms,
        "ort_over_eager": ms["onnxruntime_ms"]["median"] / ms["eager_ms"]["median"],
        "int8_over_eager": ms["int8_ms"]["median"] / ms["eager_ms"]["median"],
        "int8_over_ort": ms["int8_ms"]["median"] / ms["onnxruntime_ms"]["median"],
        "eager_images_per_s": batch / ms["eager_ms"]["median"] * 1000.0,
        "onnxruntime_images_per_s": batch / ms["onnxruntime_ms"]["median"] * 1000.0,
        "int8_images_per_s": batch / ms["int8_ms"]["median"] * 1000.0,
        "max_abs_logit_diff": max_diff,
    }


def _machine(threads: int) -> dict:
    import onnx
    import onnxruntime
    import timm

    from search.export.int8 import cpu_int8_flags

    return {
        "cpu_int8_flags": cpu_int8_flags(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "timm": timm.__version__,
        "threads": threads,
        "load_average_1min_before": os.getloadavg()[0],
    }


def checked(rows: list[dict]) -> list[dict]:
    """The rows, once they are known to measure the exported model at every batch size."""
    problems = []
    if [row["batch"] for row in rows] != list(BATCH_SIZES):
        problems.append(f"batch sizes {[row['batch'] for row in rows]}, asked for {list(BATCH_SIZES)}")
    for row in rows:
        times = [row[k][stat] for k in ("eager_ms", "onnxruntime_ms", "int8_ms") for stat in ("median", "min")]
        if not all(t > 0 for t in times):
            problems.append(f"batch {row['batch']}: a time of zero or less ({times})")
        if not row["max_abs_logit_diff"] <= MAX_LOGIT_DIFF:
            problems.append(f"batch {row['batch']}: ONNX Runtime's logits differ from eager's by "
                            f"{row['max_abs_logit_diff']:.2e} (> {MAX_LOGIT_DIFF}): not the same model")
    if problems:
        raise BenchError("export_latency measured nothing trustworthy: " + "; ".join(problems))
    return rows


def time_model(checkpoint: Path | None, backbone: str, image_size: int, runs: int, warmup: int,
               threads: int) -> dict:
    """Export and quantize one model, time the three runtimes at every batch size."""
    from search.config import Int8Config
    from search.export.int8 import quantize_int8
    from search.export.onnx import DEFAULT_OPSET, create_session, export_onnx

    model, backbone, image_size = _load(checkpoint, backbone, image_size)
    with tempfile.TemporaryDirectory(prefix="tunecv-bench-") as tmp:
        onnx_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        opset = export_onnx(model, onnx_path, image_size=image_size, opset=DEFAULT_OPSET)
        calibration = [torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(i)).numpy()
                       for i in range(4)]
        quantize_int8(onnx_path, int8_path, calibration, Int8Config(), "input")
        session = create_session(onnx_path, num_threads=threads)
        int8_session = create_session(int8_path, num_threads=threads)
        # Fewer timed runs at batch 32: one resnet50 batch takes seconds in eager.
        rows = checked([_time_batch(model, session, int8_session, b, image_size, runs if b == 1 else max(3, runs // 3),
                                    warmup if b == 1 else min(warmup, 2)) for b in BATCH_SIZES])
    return {
        "backbone": backbone, "image_size": image_size,
        "source": str(checkpoint) if checkpoint else "random init",
        "params": sum(p.numel() for p in model.parameters()), "opset": opset, "results": rows,
    }


def digits_int8_accuracy() -> dict:
    """The int8 gate on real data: resnet10t trained 3 epochs on the digits at 32 px."""
    from search.config import Int8Config, parse_config
    from search.export.onnx import export_checkpoint
    from search.jobs.train import train
    from trainables.data.split_files import read_split
    from trainables.data.demo_data import write_digits

    with tempfile.TemporaryDirectory(prefix="tunecv-bench-int8-") as tmp:
        write_digits(Path(tmp) / "digits", image_size=32)
        cfg = parse_config({
            "name": "int8", "output_dir": f"{tmp}/runs",
            "data": {"root": f"{tmp}/digits", "image_size": 32, "num_workers": 0},
            "model": {"backbone": "resnet10t", "pretrained": False},
            "optim": {"epochs": 3, "batch_size": 64, "lr_head": 3e-3, "lr_base": 3e-3, "warmup_epochs": 0.2},
        })
        run_dir = train(cfg, print_fn=lambda *_: None)
        result = export_checkpoint(run_dir / "best", read_split(str(run_dir / "split.parquet")),
                                   Path(tmp) / "export", int8=Int8Config())
    return {"model": "resnet10t, 3 epochs on digits at 32 px, random init", "num_images": result.num_images,
            **{k: result.int8[k] for k in ("shipped", "fp32_macro_f1", "macro_f1", "macro_f1_drop_points",
                                           "argmax_agreement", "largest_class_drop", "calibration")}}


def targets_met(models: list[dict], accuracy: dict | None) -> dict:
    """Each target, and whether every model and batch size met it."""
    rows = [row for model in models for row in model["results"]]
    met = {
        "ort_over_eager": all(row["ort_over_eager"] <= TARGETS["ort_over_eager"] for row in rows),
        "int8_over_eager": all(row["int8_over_eager"] <= TARGETS["int8_over_eager"] for row in rows),
    }
    if accuracy is not None:
        met["int8_drop_points"] = accuracy["macro_f1_drop_points"] <= TARGETS["int8_drop_points"]
    return {"targets": TARGETS, "met": met}


def run(checkpoint: Path | None, runs: int, warmup: int, models=MODELS, accuracy: bool = True) -> dict:
    """Time every model (or the checkpoint alone), measure int8 accuracy, return the checked results."""
    threads = torch.get_num_threads()
    machine = _machine(threads)
    chosen = [(None, None)] if checkpoint is not None else models
    timed = [time_model(checkpoint, backbone, size, runs, warmup, threads) for backbone, size in chosen]
    digits = digits_int8_accuracy() if accuracy else None
    machine["load_average_1min_after"] = os.getloadavg()[0]
    return {"models": timed, "int8_accuracy": digits, **targets_met(timed, digits), "machine": machine,
            "runs": runs, "warmup": warmup}


def format_table(report: dict) -> str:
    """The results as a plain-text table."""
    machine = report["machine"]
    flags = ", ".join(f for f, on in machine["cpu_int8_flags"].items() if on) or "none"
    lines = [
        f"{machine['threads']} thread(s), median of {report['runs']} runs (batch 32: fewer) after warm-up; "
        f"CPU int8 flags: {flags}",
        f"{'model':>22}  {'batch':>5}  {'eager ms':>9}  {'ORT ms':>8}  {'int8 ms':>8}  {'ORT/eager':>9}  "
        f"{'int8/eager':>10}  {'max |diff|':>10}",
    ]
    for model in report["models"]:
        name = f"{model['backbone']}@{model['image_size']}"
        for row in model["results"]:
            lines.append(
                f"{name:>22}  {row['batch']:>5}  {row['eager_ms']['median']:>9.2f}  "
                f"{row['onnxruntime_ms']['median']:>8.2f}  {row['int8_ms']['median']:>8.2f}  "
                f"{row['ort_over_eager']:>9.2f}  {row['int8_over_eager']:>10.2f}  {row['max_abs_logit_diff']:>10.1e}"
            )
    if report["int8_accuracy"]:
        acc = report["int8_accuracy"]
        lines.append(f"int8 on the digits ({acc['num_images']} val images): macro-F1 {acc['macro_f1']:.4f} vs fp32 "
                     f"{acc['fp32_macro_f1']:.4f} ({acc['macro_f1_drop_points']:.2f} points lost), argmax "
                     f"agreement {acc['argmax_agreement']:.4f}, shipped: {acc['shipped']}")
    lines.append("targets met: " + ", ".join(f"{k} <= {report['targets'][k]}: {v}" for k, v in report["met"].items()))
    load = max(machine["load_average_1min_before"], machine["load_average_1min_after"])
    lines.append(
        f"load average {machine['load_average_1min_before']:.2f} before, "
        f"{machine['load_average_1min_after']:.2f} after, {machine['cpu_count']} CPUs"
    )
    # Our own run adds about `threads` to the load; more than the CPUs means contention.
    if load > machine["cpu_count"] + 0.5:
        lines.append("WARNING: other processes shared the CPUs; eager latency is inflated most.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: resnet10t)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs at batch 1 (a third of them at 32)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--threads", type=int, help="threads for both (default: torch's)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the int8 accuracy check on the digits")
    parser.add_argument("--smoke", action="store_true",
                        help="resnet10t at 32 px, 3 runs, 1 warm-up, no accuracy check: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where export_latency.json goes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.warmup = 3, 1
    if args.runs < 1 or args.warmup < 0:
        parser.error(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}.")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    report = run(args.checkpoint, args.runs, args.warmup, SMOKE_MODELS if args.smoke else MODELS,
                 accuracy=not (args.smoke or args.no_accuracy))
    path = write_result("export_latency", report, args.results)
    print(format_table(report))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
