"""A run's data: listed before Ray starts, scanned once through the scan cache (on Ray
when connected), and split into the fixed split every trial and the export use, written
by the driver before any trial; and its printed summary (counts per class and split,
each skipped file with its reason). A pack (``data.loader: ray_data``) is not scanned:
it holds the split it was packed with.
"""

from __future__ import annotations

from search.config import ConfigError, RunConfig
from search.scan_cache import cached_scan
from trainables.data.datasets import DataSplit, Listing, list_data, split_scanned
from trainables.data.packs import read_pack, read_pack_split

_MAX_LISTED_BAD_FILES = 20


def list_run_data(cfg: RunConfig) -> Listing | None:
    """What ``data.root`` holds, read from its listing alone (no image is opened): a bad
    root, manifest or layout fails here, before Ray starts. None for a pack
    (``data.loader: ray_data``): it holds its split, which ``scan_data`` reads.

    Raises:
        trainables.data.layouts.DataError: The root or manifest cannot give candidates.
    """
    if cfg.data.loader == "ray_data":
        return None
    return list_data(cfg.data.root, cfg.data.manifest)


def scan_data(cfg: RunConfig, print_fn=print, listing: Listing | None = None) -> DataSplit:
    """Scan (reusing ``output_dir``'s scan cache; on Ray when connected) and split the
    data, print the summary; nothing but the cache is written.

    Raises:
        trainables.data.layouts.DataError: The data cannot produce a usable split.
    """
    if cfg.data.loader == "ray_data":  # the split was made when the images were packed
        split = read_pack_split(read_pack(cfg.data.root))
    else:
        listing = listing or list_run_data(cfg)
        scanned, _ = cached_scan(cfg.output_dir, listing, cfg.data.max_image_pixels, print_fn,
                                 rescan=cfg.data.rescan)
        split = split_scanned(listing, scanned, val_fraction=cfg.data.val_fraction, seed=cfg.optim.seed,
                              strict=cfg.data.strict, test_fraction=cfg.data.test_fraction)
    print_fn(describe_split(split))
    return split


def check_batch_sizes(cfg: RunConfig, num_train: int, searched: tuple[int, ...] | None = None,
                      space: str | None = None) -> None:
    """Every batch size a trial may get (``optim.batch_size``, or the space's ``searched``
    sizes) fits each worker's share of the training set: the loader drops the last
    partial batch, so a larger batch trains nothing.

    Raises:
        ConfigError: Naming the field, the sizes and the largest that fits.
    """
    workers = max(1, cfg.scaling.num_workers)
    per_worker = num_train // workers
    share = f"the {num_train} training images" + (f" ({per_worker} for each of {workers} workers)"
                                                  if workers > 1 else "")
    if searched is None:
        if cfg.optim.batch_size > per_worker:
            raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} is larger than {share}; set "
                              f"optim.batch_size to at most {per_worker}.")
        return
    too_large = [size for size in searched if size > per_worker]
    if too_large:
        raise ConfigError(f"space '{space}' searches batch_size {list(searched)}, and {too_large} "
                          f"{'is' if len(too_large) == 1 else 'are'} larger than {share}. Use a space whose "
                          f"batch sizes are at most {per_worker} (search.space), or add training data.")


def describe_split(split: DataSplit) -> str:
    """Counts per class and split, and every skipped file with its reason."""
    train, val, test = (split.class_counts(name) for name in ("train", "val", "test"))
    lines = [
        f"data: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test images, "
        f"{len(split.class_names)} classes, fingerprint {split.fingerprint()[:12]}"
    ]
    for name, n_train, n_val, n_test in zip(split.class_names, train, val, test):
        lines.append(f"  {name}: {n_train} train, {n_val} val, {n_test} test")
    if split.bad_files:
        lines.append(f"skipped {len(split.bad_files)} bad file(s):")
        for bad in split.bad_files[:_MAX_LISTED_BAD_FILES]:
            lines.append(f"  {bad.path}: {bad.reason}")
        if len(split.bad_files) > _MAX_LISTED_BAD_FILES:
            lines.append(f"  ... and {len(split.bad_files) - _MAX_LISTED_BAD_FILES} more (see split.json)")
    return "\n".join(lines)
