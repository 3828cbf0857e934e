"""Training throughput with each loader: the DataLoader over the image files against Ray
Data streaming their pack, on the digits at 64 px (resnet10t, batch 64), as
``trainables.training.loop.train_one_epoch`` runs them (decode, augment, forward, backward, step).

Both run in this process against one local Ray (2 CPUs): the DataLoader decodes in the
training process (``data.num_workers: auto`` on 2 CPUs), Ray Data's tasks decode on the
CPUs Ray has free. Passes alternate A B B A so that drift on a shared machine hits both
alike; the first epoch of each (the DataLoader's decode cache filling, Ray Data's start)
is timed apart. It refuses to write a result when a pass saw other than its epoch's images.

    .venv/bin/python -m bench.data_stream [--pairs 3]
    .venv/bin/python -m bench.data_stream --smoke --results DIR   # synthetic 16 px, 1 pair (tests)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import RESULTS, BenchError, digits_root, local_ray, machine, smoke_root, write_result

LOADERS = ("dataloader", "ray_data")


def _config(root: Path, out: Path, loader: str, smoke: bool):
    from search.config import parse_config

    return parse_config({
        "name": "data-stream", "output_dir": str(out),
        "data": {"root": str(root), "image_size": 16 if smoke else 64, "loader": loader,
                 **({"num_workers": 1} if loader == "ray_data" else {})},
        "model": {"backbone": "test_resnet" if smoke else "resnet10t", "pretrained": False},
        "optim": {"epochs": 2, "batch_size": 16 if smoke else 64, "warmup_epochs": 0.5},
        "augment": {"strength": 0.5, "hflip": False, "coarse_dropout_p": 0.0},
    })


def _parts(cfg):
    from search.data import scan_data
    from trainables.training.loop import _build
    from trainables.runtime.ranks import local_runtime

    split = scan_data(cfg, print_fn=lambda *_: None)
    runtime = local_runtime(False)
    return _build(cfg.trial(), split, runtime, resume_from=None), runtime


def _epoch(parts, runtime, epoch: int, batch_size: int) -> dict:
    import torch

    from trainables.training.loop import _set_epoch, train_one_epoch

    _set_epoch(parts.train_loader, epoch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    start = time.perf_counter()
    _, seen = train_one_epoch(parts, runtime, 1, scaler)
    wall_s = time.perf_counter() - start
    if seen != len(parts.train_loader) * batch_size:
        raise BenchError(f"an epoch saw {seen} images, expected {len(parts.train_loader)} batches")
    return {"images": seen, "wall_s": round(wall_s, 3), "images_per_s": round(seen / wall_s, 1)}


def main(argv: list[str] | None = None) -> Path:
    from search.jobs.pack import pack_dataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3, help="A B B A rounds")
    parser.add_argument("--smoke", action="store_true", help="synthetic 16 px, 1 round: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    pairs = 1 if args.smoke else args.pairs
    images = smoke_root() if args.smoke else digits_root(64)
    with tempfile.TemporaryDirectory(prefix="tunecv-bench-") as tmp, local_ray():
        tmp = Path(tmp)
        pack_dataset(_config(images, tmp, "dataloader", args.smoke), str(tmp / "pack"), print_fn=lambda *_: None)
        built = {}
        for loader in LOADERS:
            cfg = _config(images if loader == "dataloader" else tmp / "pack", tmp, loader, args.smoke)
            parts, runtime = _parts(cfg)
            batch = cfg.optim.batch_size
            built[loader] = (parts, runtime, batch, _epoch(parts, runtime, 1, batch))  # the first epoch, apart
        passes = {loader: [] for loader in LOADERS}
        epoch = 2
        for _ in range(pairs):
            for loader in (*LOADERS, *reversed(LOADERS)):
                parts, runtime, batch, _ = built[loader]
                passes[loader].append(_epoch(parts, runtime, epoch, batch))
                epoch += 1
    median = {loader: statistics.median(p["images_per_s"] for p in passes[loader]) for loader in LOADERS}
    result = {
        "benchmark": "training images/s: DataLoader over image files vs Ray Data over their pack",
        "data": "synthetic 16 px" if args.smoke else "bundled digits, 64 px", "pairs": pairs,
        "first_epoch": {loader: built[loader][3] for loader in LOADERS},
        "passes": passes, "images_per_s_median": median,
        "ray_data_over_dataloader": round(median["ray_data"] / median["dataloader"], 3),
        "machine": machine(), "smoke": args.smoke,
    }
    path = write_result("data_stream", result, args.results)
    print(f"images/s (median of {2 * pairs} passes): dataloader {median['dataloader']:.1f}, ray_data "
          f"{median['ray_data']:.1f} ({result['ray_data_over_dataloader']:.2f}x) -> {path}")
    return path


if __name__ == "__main__":
    main()
