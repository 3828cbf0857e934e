"""On a GPU: how the loader-fed training rate scales with DataLoader processes, beside
the bare-step ceiling. Input for issue 13's loader defaults (workers and torch threads
from the trial's CPU share). Runs ``bench.gpu_check``'s one-configuration trial per
worker count and records images/s over the whole run and NVML utilisation.

    python -m bench.loader_scaling --out loader_scaling.json [--workers 0 2 4 8 12] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from bench.gpu_check import _step_ceiling, _train
    from trainables.data.demo_data import write_digits

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8, 12])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet10t"])
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cpus": __import__("os").cpu_count(), "epochs": args.epochs, "image_size": args.image_size,
               "runs": [], "ceiling": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_digits(work / "digits", image_size=args.image_size)
        for backbone in args.backbones:
            results["ceiling"][backbone] = _step_ceiling(backbone, args.image_size, 128)
            for workers in args.workers:
                start = time.time()
                out = _train(work, work / "digits", f"{backbone}-w{workers}", gpu=True, precision="bf16",
                             backbone=backbone, image_size=args.image_size, epochs=args.epochs, batch_size=128,
                             loader_workers=workers, sampler=True)
                out.pop("run_dir", None)
                row = {"backbone": backbone, "loader_workers": workers, "seconds": round(time.time() - start, 1),
                       "macro_f1": out["macro_f1"], **{k: out["gpu"][k] for k in
                       ("train_images_per_s_overall", "util_mean_pct", "util_p50_pct", "samples")}}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ceiling"]))


if __name__ == "__main__":
    main()
