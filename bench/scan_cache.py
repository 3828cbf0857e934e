"""The scan cache on a 20k-image set: a cold scan, a warm one (nothing changed), and one
after a single file changed, each through ``search/scan_cache.py:cached_scan`` as a run
calls it (the listing is timed with it: a warm scan still lists the root).

Measured side by side in one process, on this process's threads (no Ray: on one
machine Ray tasks only add their start-up; the cache is what is measured). Target:
warm ≤ 0.1× cold. It refuses to write a result when the warm scan read any file, or
the one-change scan read other than that one.

    .venv/bin/python -m bench.scan_cache [--images 20000]
    .venv/bin/python -m bench.scan_cache --smoke --results DIR   # 500 images (tests)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import REPO, RESULTS, BenchError, machine, write_result

TARGET_RATIO = 0.1


def _write_images(root: Path, count: int, classes: int = 10) -> None:
    """``count`` distinct 32 px PNGs in ``classes`` class folders (random pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")


def _timed_scan(root: Path, out: str):
    from search.scan_cache import cached_scan
    from trainables.data.datasets import list_data

    start = time.perf_counter()
    _, stats = cached_scan(out, list_data(root), 89_478_485, print_fn=lambda *_: None)
    return time.perf_counter() - start, stats


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--smoke", action="store_true", help="500 images: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    count = 500 if args.smoke else args.images
    root = REPO / "data" / f"scan_bench_{count}"
    if not (root / "class_0").is_dir():  # written once: the same images for every run
        _write_images(root, count)
    with tempfile.TemporaryDirectory(prefix="tunecv-bench-") as out:
        cold_s, cold = _timed_scan(root, out)
        warm_s, warm = _timed_scan(root, out)
        changed = root / "class_3" / "000003.png"
        changed.write_bytes(changed.read_bytes())  # same bytes, a new mtime: read again
        one_s, one = _timed_scan(root, out)
    if cold.scanned != count or warm.scanned != 0 or one.scanned != 1:
        raise BenchError(f"files read: cold {cold.scanned} of {count}, warm {warm.scanned} (want 0), "
                         f"one changed {one.scanned} (want 1)")
    ratio = warm_s / cold_s
    result = {
        "images": count, "image_px": 32, "executor": "threads",
        "cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3), "one_changed_s": round(one_s, 3),
        "warm_over_cold": round(ratio, 4), "one_changed_over_cold": round(one_s / cold_s, 4),
        "target": {"warm_over_cold_at_most": TARGET_RATIO, "met": ratio <= TARGET_RATIO},
        "machine": machine(), "smoke": args.smoke,
    }
    path = write_result("scan_cache", result, args.results)
    print(f"scan of {count} images: cold {cold_s:.2f} s, warm {warm_s:.2f} s ({ratio:.3f}x), "
          f"one changed {one_s:.2f} s -> {path}")
    return path


if __name__ == "__main__":
    main()
