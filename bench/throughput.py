"""Training-loop throughput against raw forward+backward, and decode+augment per worker.

Owns one question from the issue: on the bundled digits, how close does the real loop
(``trainables.training.loop.train_one_epoch`` over the real DataLoader: worker, PNG decode,
augmentation) get to the same model, optimizer and loss stepping on batches already
decoded and augmented, with the same torch threads, in the same process? Target:
loop / raw >= 0.9. Also times decode + augment in one process, which is what one
DataLoader worker can supply. Loop and raw passes alternate (ABBA); each pass records
the CPU that other processes used (from /proc, ``bench/timing.py``), and passes on a
busy machine are kept but left out of the medians. No product code changes: the parts
come from ``_build``.

Before it writes ``bench/results/throughput.json`` it checks what it measured: at least
one loop/raw pair, every rate above zero, and a loop/raw ratio in (0, 10); otherwise it
raises ``BenchError``.

Usage (from the repository root; the config's relative paths are taken from it):
    python -m bench.throughput [--config configs/digits.yaml] [--set data.num_workers=0]
        [--repeats 7] [--budget-s 300] [--epochs 1] [--steps N] [--results DIR]
    python -m bench.throughput --smoke --results DIR   # 1 pair of 2 steps, 160 synthetic images (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench._common import REPO, RESULTS, BenchError, smoke_root, write_result
from bench.timing import StepClock, timed

DIGITS_ROOT = Path("data/digits")
TARGET_RATIO = 0.9
# Cores other processes may use during a pass before it is marked contended (a tenth
# of this 2-core machine already slows a 2-thread torch step measurably).
CLEAN_OTHER_CORES = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, as `tunecv train --set` (repeatable)")
    parser.add_argument("--repeats", type=int, default=7, help="clean loop/raw pairs wanted")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no new pair after this long, even with fewer clean pairs")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed loop pass")
    parser.add_argument("--steps", type=int, default=None,
                        help="cap on batches per epoch (default: a full epoch); short passes "
                             "overstate worker cost: batches prefetched past the cap are dropped")
    parser.add_argument("--decode-images", type=int, default=1000,
                        help="images per decode+augment measurement")
    parser.add_argument("--smoke", action="store_true",
                        help="1 pair of 2 steps on 160 synthetic images at 16 px: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where throughput.json goes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.budget_s, args.steps, args.decode_images = 1, 1.0, 2, 16
        args.set = [f"data.root={smoke_root()}", "data.image_size=16", *args.set]
    for name in ("repeats", "epochs", "steps", "decode_images", "budget_s"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    args.config, args.results = args.config.resolve(), args.results.resolve()
    return args


# ---- the three measurements ----

def loop_pass(parts, runtime, accum_steps: int, scaler, epochs: int, first_epoch: int) -> int:
    """The real loop: ``train_one_epoch`` as ``run_trial`` calls it, ``epochs`` times."""
    from trainables.training.loop import train_one_epoch

    seen = 0
    for epoch in range(first_epoch, first_epoch + epochs):
        parts.train_loader.sampler.set_epoch(epoch)
        seen += train_one_epoch(parts, runtime, accum_steps, scaler)[1]
    return seen


def raw_pass(parts, runtime, accum_steps: int, batches) -> int:
    """Forward, loss, backward and optimizer step on pre-decoded batches: no loader.

    Same model, optimizer, loss, precision and accumulation as the loop; no scheduler,
    no loss bookkeeping. One ``float(loss)`` at the end, as the loop syncs once.
    """
    import torch

    from trainables.model.backbones import set_train_mode

    model, optimizer, p = parts.model, parts.optimizer, parts.precision
    set_train_mode(model)
    optimizer.zero_grad(set_to_none=True)
    images, n_batches = 0, len(batches)
    for i, (x, y) in enumerate(batches):
        with torch.autocast(runtime.device.type, dtype=p.dtype, enabled=p.dtype is not None):
            loss = parts.loss_fn(model(x), y)
        (loss / accum_steps).backward()
        if (i + 1) % accum_steps == 0 or i + 1 == n_batches:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images += x.shape[0]
    float(loss.detach())
    return images


def collect_batches(loader, epoch: int, epochs: int) -> list:
    """The loop loader's own batches (decoded and augmented), held in memory."""
    batches = []
    for e in range(epoch, epoch + epochs):
        loader.sampler.set_epoch(e)
        batches += [(x.clone(), y.clone()) for x, y in loader]
    return batches


def read_items(dataset, num_images: int) -> int:
    """``dataset[i]`` for ``num_images`` indices, wrapping around, as a worker reads them."""
    for i in range(num_images):
        dataset[i % len(dataset)]
    return num_images


def measure_decode(cfg, split, model, num_images: int, repeats: int) -> dict:
    """Median images/s of decode+augment and of decode alone, worker thread settings."""
    import cv2
    import torch

    from trainables.model.backbones import data_config, unwrap
    from trainables.data.datasets import ImageDataset
    from trainables.data.transforms import create_train_transform

    pre = data_config(unwrap(model))  # the same transform _build gives the train loader
    tf = create_train_transform(cfg.data.image_size, cfg.augment, pre["mean"], pre["std"])
    augmented, decoded = (
        ImageDataset(split.root, split.train, t, max_pixels=cfg.data.max_image_pixels)
        for t in (tf, None)
    )
    # A DataLoader worker runs torch with 1 thread; loaders._worker_init turns off
    # OpenCV's pool. Match both here, then restore the training process's settings.
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    try:
        full = [timed(lambda: read_items(augmented, num_images)) for _ in range(repeats)]
        bare = [timed(lambda: read_items(decoded, num_images)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    return {
        "images_per_measurement": num_images,
        "decode_augment_runs": full,
        "decode_only_runs": bare,
        "decode_augment_images_per_s": _median(full),
        "decode_only_images_per_s": _median(bare),
    }


def _median(runs: list[dict], key: str = "images_per_s", digits: int = 2) -> float:
    return round(statistics.median(r.get(key, float("nan")) for r in runs), digits)


# ---- orchestration ----

def load_run_config(args: argparse.Namespace):
    """Make sure the digits exist (as `tunecv data digits data/digits --image-size 64`), load."""
    from search.config import load_config
    from trainables.data.demo_data import write_digits

    if not args.smoke and not DIGITS_ROOT.is_dir():  # the smoke run has its own 16 px copy
        print(f"writing the bundled digits to {DIGITS_ROOT} (64 px)")
        write_digits(DIGITS_ROOT, image_size=64)
    return load_config(args.config, args.set)


def prepare(cfg):
    """The split as `tunecv train` prepares it, then the loop's own parts."""
    from trainables.data.datasets import prepare_split
    from trainables.training.loop import _build
    from trainables.runtime.ranks import local_runtime

    split = prepare_split(
        cfg.data.root, manifest=cfg.data.manifest, val_fraction=cfg.data.val_fraction,
        seed=cfg.optim.seed, strict=cfg.data.strict, max_pixels=cfg.data.max_image_pixels,
    )
    runtime = local_runtime(cfg.scaling.use_gpu)
    return split, runtime, _build(cfg.trial(), split, runtime, resume_from=None)


def run_pairs(parts, runtime, cfg, args) -> dict:
    """Cold loop epoch, warm-up, then alternating loop/raw pairs until enough are clean.

    The machine may be shared: a pass during which other processes used more than
    ``CLEAN_OTHER_CORES`` is kept in the record but marked contended, and pairs go on
    (within ``--budget-s``) until ``--repeats`` pairs are clean.
    """
    import torch

    accum = cfg.optim.grad_accum_steps
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=parts.precision.grad_scaling)
    parts.train_loader = loader = StepClock(parts.train_loader, args.steps)
    epoch = 1

    def timed_loop() -> dict:
        nonlocal epoch
        first, epoch = epoch, epoch + args.epochs  # a fresh shuffle for every pass
        return timed(lambda: loop_pass(parts, runtime, accum, scaler, args.epochs, first), loader)

    # Epoch 1 of every trial: forks the (persistent) worker and fills its prefetch queue.
    cold = timed(lambda: loop_pass(parts, runtime, accum, scaler, 1, epoch), loader)
    batches = StepClock(collect_batches(loader, epoch + 1, args.epochs))
    epoch += 1 + args.epochs
    raw_pass(parts, runtime, accum, batches)  # warm-up: allocator and oneDNN caches
    loop, raw, start = [], [], time.perf_counter()
    while _clean_pairs(loop, raw) < args.repeats:
        if loop and time.perf_counter() - start > args.budget_s:
            print(f"  budget of {args.budget_s:.0f} s spent: {_clean_pairs(loop, raw)} clean pairs")
            break
        if len(loop) % 2 == 0:  # ABBA: loop, raw, raw, loop, ... against drift
            loop.append(timed_loop())
        raw.append(timed(lambda: raw_pass(parts, runtime, accum, batches), batches))
        if len(loop) < len(raw):
            loop.append(timed_loop())
        clean = _is_clean(loop[-1]) and _is_clean(raw[-1])
        note = "" if clean else "  (contended: other processes busy)"
        print(f"  pair {len(loop)}: loop {loop[-1]['images_per_s']:.1f}, "
              f"raw {raw[-1]['images_per_s']:.1f} images/s{note}", flush=True)
    return {"cold_first_epoch": cold, "loop_runs": loop, "raw_runs": raw}


def _is_clean(run: dict) -> bool:
    return run.get("other_cores", 0.0) <= CLEAN_OTHER_CORES


def _clean_pairs(loop: list[dict], raw: list[dict]) -> int:
    return sum(_is_clean(a) and _is_clean(b) for a, b in zip(loop, raw))


def machine_info(cfg, workers: int) -> dict:
    import albumentations
    import cv2
    import timm
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "data_workers_config": cfg.data.num_workers,
        "data_workers": workers,  # what _build chose: data.num_workers may say "auto"
        "torch": torch.__version__,
        "timm": timm.__version__,
        "albumentations": albumentations.__version__,
        "opencv": cv2.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def summarise(pairs: dict, decode: dict) -> dict:
    """Medians over the clean pairs (over all pairs, flagged, when none was clean)."""
    all_pairs = list(zip(pairs["loop_runs"], pairs["raw_runs"]))
    clean = [(a, b) for a, b in all_pairs if _is_clean(a) and _is_clean(b)]
    used = clean or all_pairs
    loop_used, raw_used = [a for a, _ in used], [b for _, b in used]
    loop_med, raw_med = _median(loop_used), _median(raw_used)
    ratio = loop_med / raw_med
    per_pair = [a["images_per_s"] / b["images_per_s"] for a, b in used]
    decode_rate = decode["decode_augment_images_per_s"]
    return {
        "loop_images_per_s_median": loop_med,
        "raw_images_per_s_median": raw_med,
        "ratio": round(ratio, 3),  # of the medians: the loop / raw images/s
        "ratio_per_pair": [round(r, 3) for r in per_pair],
        "ratio_median_of_pairs": round(statistics.median(per_pair), 3),
        # the same from median step times: robust to bursts of outside load within a pass
        "ratio_of_step_medians": round(_median(loop_used, "step_median_images_per_s")
                                       / _median(raw_used, "step_median_images_per_s"), 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "pairs_run": len(all_pairs),
        "pairs_used": len(used),
        "contended": not clean,
        "clean_other_cores_max": CLEAN_OTHER_CORES,
        # e.g. 170 images/s of training / 2,700 images/s per worker = 0.06 of a core
        "decode_augment_cores_at_loop_rate": round(loop_med / decode_rate, 3),
        # what the workers really used (decode, augment, collate, IPC), from /proc
        "worker_cores_measured": _median(loop_used, "child_cores", digits=3),
    }


WHAT_IS_TIMED = {
    "loop": "trainables.training.loop.train_one_epoch on the parts from trainables.training.loop._build: DataLoader "
            "iteration (persistent worker(s), PNG decode, albumentations, collate), forward, loss, "
            "backward, AdamW step, LR scheduler, loss bookkeeping. Worker start-up and first-step "
            "warm-up are excluded (cold_first_epoch has them), as are evaluation and checkpoints.",
    "raw": "the same model/optimizer/loss/precision stepping over one epoch of the loop loader's "
           "own batches held in memory; no DataLoader, no scheduler; same process and threads.",
    "decode_augment": "ImageDataset.__getitem__ with the train transform in this process, torch at "
                      "1 thread and cv2.setNumThreads(0), as in one DataLoader worker.",
}


def checked(pairs: dict, decode: dict, summary: dict) -> dict:
    """The summary, once every pass is known to have measured something."""
    runs = pairs["loop_runs"] + pairs["raw_runs"] + decode["decode_augment_runs"] + decode["decode_only_runs"]
    problems = []
    if summary["pairs_run"] < 1:
        problems.append("no loop/raw pair ran")
    if not all(run["images"] > 0 and run["images_per_s"] > 0 for run in runs):
        problems.append("a pass saw no images or took no time")
    for key in ("ratio", "ratio_of_step_medians"):
        if not (math.isfinite(summary[key]) and 0 < summary[key] < 10):
            problems.append(f"{key} {summary[key]} is outside (0, 10)")
    if problems:
        raise BenchError("throughput measured nothing trustworthy: " + "; ".join(problems))
    return summary


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    # The config's relative paths (data/digits) are repository-relative; the caller's
    # working directory comes back afterwards (the smoke test runs inside pytest).
    with contextlib.chdir(REPO):
        return measure(args)


def measure(args: argparse.Namespace) -> Path:
    import torch

    cfg = load_run_config(args)
    split, runtime, parts = prepare(cfg)
    workers = parts.train_loader.num_workers  # before run_pairs wraps the loader
    steps = min(args.steps or len(parts.train_loader), len(parts.train_loader))
    print(f"{len(split.train)} train images, {steps} batches of {cfg.optim.batch_size} per epoch, "
          f"torch threads {torch.get_num_threads()}, data workers {workers} "
          f"(data.num_workers: {cfg.data.num_workers})")
    pairs = run_pairs(parts, runtime, cfg, args)
    decode = measure_decode(cfg, split, parts.model, args.decode_images, repeats=5)
    summary = checked(pairs, decode, summarise(pairs, decode))
    result = {
        "benchmark": "training-loop throughput vs raw forward+backward (bundled digits)",
        "what_is_timed": WHAT_IS_TIMED,
        "machine": machine_info(cfg, workers),
        "config_file": os.path.relpath(args.config, REPO),
        "smoke": args.smoke,
        "overrides": args.set,
        "config": cfg.model_dump(mode="json"),
        "measurement": {
            "clean_pairs_wanted": args.repeats, "budget_s": args.budget_s,
            "epochs_per_pass": args.epochs, "batches_per_epoch": steps,
            "train_images": len(split.train),
        },
        "summary": summary,
        **pairs,
        "decode_augment_per_worker": decode,
    }
    path = write_result("throughput", result, args.results)
    print_summary(summary, pairs, decode, path)
    return path


def print_summary(summary: dict, pairs: dict, decode: dict, out: Path) -> None:
    met = "meets" if summary["meets_target"] else "MISSES"
    used = f"{summary['pairs_used']} of {summary['pairs_run']} pairs"
    if summary["contended"]:
        used += ", ALL CONTENDED by other processes: rerun on a quiet machine"
    print(f"loop {summary['loop_images_per_s_median']:.1f} images/s, raw "
          f"{summary['raw_images_per_s_median']:.1f} images/s (medians of {used}): ratio "
          f"{summary['ratio']:.3f}, {met} the {TARGET_RATIO} target")
    print(f"per pair {summary['ratio_per_pair']}")
    print(f"from median step times: ratio {summary['ratio_of_step_medians']:.3f} "
          f"(median of per-pair ratios {summary['ratio_median_of_pairs']:.3f})")
    print(f"data workers used {summary['worker_cores_measured']:.2f} of a core during the loop "
          f"(decode+augment alone would need {summary['decode_augment_cores_at_loop_rate']:.2f})")
    print(f"cold first epoch (worker start-up included): "
          f"{pairs['cold_first_epoch']['images_per_s']:.1f} images/s")
    print(f"decode+augment, one worker: {decode['decode_augment_images_per_s']:.0f} images/s "
          f"(decode alone {decode['decode_only_images_per_s']:.0f}); wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
