"""CPU latency of PyTorch eager against ONNX Runtime for one exported model, side by side.

A benchmark, not a test: it exports a checkpoint (or, by default, a freshly created,
randomly initialised resnet10t at 64 px with 10 classes) with ``search.export.onnx.export_onnx``
and times both runtimes at batch 1 and 32 with the same thread count
(``torch.get_num_threads()`` or ``--threads``, ONNX Runtime's ``intra_op_num_threads`` set
equal). Each timed run alternates eager and ONNX Runtime, so both see the same machine load;
on a busy machine torch's OpenMP threads wait on each other, so eager suffers far more than
ONNX Runtime (measured here: resnet10t batch 1, 2 threads, one core taken: 384 ms vs 4.5 ms
at 1 thread), and the table warns when the load average says the CPUs were not free.
It writes ``bench/results/export_latency.json`` and prints a table. Before it writes, it
checks what it measured: both batch sizes timed, every time above zero, and the two
runtimes' logits within ``MAX_LOGIT_DIFF`` (a wrong export would time the wrong model);
otherwise it raises ``BenchError``. ``search.export.onnx.export_checkpoint`` is what
verifies accuracy on real data.

    .venv/bin/python -m bench.export_latency [--checkpoint DIR] [--runs 50] [--threads N]
    .venv/bin/python -m bench.export_latency --smoke --results DIR   # 3 runs at 32 px (tests)
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
DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES = "resnet10t", 64, 10
MAX_LOGIT_DIFF = 1e-3  # fp32 export; measured differences are about 1e-7


def _load(checkpoint: Path | None, image_size: int) -> tuple[torch.nn.Module, str, int]:
    """(eval-mode model, backbone name, image size); ``image_size`` is for the default model."""
    if checkpoint is not None:
        from trainables.checkpoint import load_model

        model, meta = load_model(checkpoint)
        return model, meta["backbone"], int(meta["preprocessing"]["image_size"])
    import timm

    torch.manual_seed(0)
    model = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=DEFAULT_NUM_CLASSES)
    return model.eval(), DEFAULT_BACKBONE, image_size


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in seconds)
    return {
        "median": statistics.median(ms),
        "p10": float(np.percentile(ms, 10)),
        "p90": float(np.percentile(ms, 90)),
        "min": ms[0],
    }


@torch.inference_mode()
def _time_batch(model, session, batch: int, image_size: int, runs: int, warmup: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    feed = {"input": x.numpy()}
    max_diff = float(np.abs(model(x).numpy() - session.run(["logits"], feed)[0]).max())
    for _ in range(warmup):
        model(x)
        session.run(["logits"], feed)
    eager, onnx = [], []
    for _ in range(runs):  # alternate, so a load spike hits both runtimes alike
        start = time.perf_counter()
        model(x)
        eager.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.run(["logits"], feed)
        onnx.append(time.perf_counter() - start)
    eager_ms, onnx_ms = _summary_ms(eager), _summary_ms(onnx)
    return {
        "batch": batch,
        "eager_ms": eager_ms,
        "onnxruntime_ms": onnx_ms,
        "ort_over_eager": onnx_ms["median"] / eager_ms["median"],
        "eager_images_per_s": batch / eager_ms["median"] * 1000.0,
        "onnxruntime_images_per_s": batch / onnx_ms["median"] * 1000.0,
        "max_abs_logit_diff": max_diff,
    }


def _machine(threads: int) -> dict:
    import onnx
    import onnxruntime
    import timm

    return {
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
        times = [row[k][stat] for k in ("eager_ms", "onnxruntime_ms") for stat in ("median", "min")]
        if not all(t > 0 for t in times):
            problems.append(f"batch {row['batch']}: a time of zero or less ({times})")
        if not row["max_abs_logit_diff"] <= MAX_LOGIT_DIFF:
            problems.append(f"batch {row['batch']}: ONNX Runtime's logits differ from eager's by "
                            f"{row['max_abs_logit_diff']:.2e} (> {MAX_LOGIT_DIFF}): not the same model")
    if problems:
        raise BenchError("export_latency measured nothing trustworthy: " + "; ".join(problems))
    return rows


def run(checkpoint: Path | None, runs: int, warmup: int, image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
    """Export, time both runtimes at every batch size, and return the checked results."""
    from search.export.onnx import DEFAULT_OPSET, create_session, export_onnx

    threads = torch.get_num_threads()
    machine = _machine(threads)
    model, backbone, image_size = _load(checkpoint, image_size)
    with tempfile.TemporaryDirectory(prefix="tunecv-bench-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        opset = export_onnx(model, onnx_path, image_size=image_size, opset=DEFAULT_OPSET)
        session = create_session(onnx_path, num_threads=threads)
        rows = checked([_time_batch(model, session, b, image_size, runs, warmup) for b in BATCH_SIZES])
    machine["load_average_1min_after"] = os.getloadavg()[0]
    return {
        "model": {
            "backbone": backbone,
            "image_size": image_size,
            "source": str(checkpoint) if checkpoint else "random init",
            "params": sum(p.numel() for p in model.parameters()),
            "opset": opset,
        },
        "machine": machine,
        "runs": runs,
        "warmup": warmup,
        "results": rows,
    }


def format_table(report: dict) -> str:
    """The results as a plain-text table."""
    model, machine = report["model"], report["machine"]
    lines = [
        f"{model['backbone']} @ {model['image_size']} px ({model['source']}), "
        f"{machine['threads']} thread(s), median of {report['runs']} runs after "
        f"{report['warmup']} warm-up",
        f"{'batch':>5}  {'eager ms':>9}  {'ORT ms':>8}  {'ORT/eager':>9}  {'eager img/s':>11}  "
        f"{'ORT img/s':>9}  {'max |diff|':>10}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['batch']:>5}  {row['eager_ms']['median']:>9.2f}  "
            f"{row['onnxruntime_ms']['median']:>8.2f}  {row['ort_over_eager']:>9.2f}  "
            f"{row['eager_images_per_s']:>11.0f}  {row['onnxruntime_images_per_s']:>9.0f}  "
            f"{row['max_abs_logit_diff']:>10.1e}"
        )
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
    parser.add_argument("--runs", type=int, default=50, help="timed runs per batch size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--threads", type=int, help="threads for both (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="3 runs, 1 warm-up, 32 px: checks, not numbers")
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
    report = run(args.checkpoint, args.runs, args.warmup, 32 if args.smoke else DEFAULT_IMAGE_SIZE)
    path = write_result("export_latency", report, args.results)
    print(format_table(report))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
