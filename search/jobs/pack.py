"""``tunecv data pack``: a run file's data (``data.root``, its manifest, the split
``data.val_fraction`` and ``optim.seed`` make) written as a pack (``trainables/data/packs.py``)
at a local path or a bucket prefix, for trials with ``data.loader: ray_data``.

The images are read by Ray Data's tasks across the cluster (``map_batches``), each
checked against the sha1 the scan recorded, and written by Ray Data's Parquet writer.
OUT must be new or empty: a pack is written once, and a half-overwritten one would mix
two splits.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from search.config import ConfigError, RunConfig
from trainables.data.datasets import Sample
from trainables.data.split_files import write_split
from trainables.data.layouts import DataError
from trainables.data.locations import resolve_location
from trainables.data.packs import PACK_JSON, PACK_SPLIT, ROWS_PER_FILE, Pack, PackFile
from trainables.data.roots import DataRoot
from trainables.data.stream import quiet


def check_pack_out(out: str) -> None:
    """Refuse an OUT that already holds anything (one listing; nothing is read or written).

    Raises:
        ConfigError: OUT is a file or not empty.
    """
    try:
        fs, base = resolve_location(out)
        info = fs.get_file_info(base)
        entries = (fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
                   if info.type == pafs.FileType.Directory else [])
    except (OSError, ValueError) as err:
        raise ConfigError(f"OUT {out!r} cannot be read ({err}); check the path or URI and its credentials.") from err
    if info.type == pafs.FileType.File:
        raise ConfigError(f"OUT {out!r} is a file; give a new or empty directory (or bucket prefix) for the pack.")
    if entries:
        shown = ", ".join(sorted(e.base_name for e in entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"OUT {out!r} is not empty ({len(entries)} entries: {shown}); nothing was written. "
                          "Give a new or empty directory or bucket prefix: a pack is written once.")


def pack_dataset(cfg: RunConfig, out: str, print_fn=print, rows_per_file: int = ROWS_PER_FILE) -> Pack:
    """Scan and split ``cfg``'s data as a run would, then write it as a pack at ``out``.

    Args:
        cfg: A run config whose ``data.root`` holds the images (``data.loader: dataloader``).
        out: A new or empty local directory or bucket prefix.
        rows_per_file: Images per Parquet file; a rank of a trial streams whole files, so a
            pack needs at least as many training files as a trial has workers.

    Returns:
        The pack, as ``pack.json`` (written last) describes it.

    Raises:
        ConfigError: OUT is not empty, or ``cfg`` already reads a pack; before any work.
        trainables.data.layouts.DataError: The data gives no usable split, or a file changed
            since it was scanned.
    """
    from search.data import list_run_data, scan_data
    from search.ray_session import connect_ray

    if cfg.data.loader != "dataloader":
        raise ConfigError("data pack reads the images at data.root; set data.loader: dataloader in the run file "
                          "used for packing (data.loader: ray_data is for the runs that read the pack).")
    if rows_per_file < 1:
        raise ConfigError(f"--rows-per-file must be at least 1, got {rows_per_file}.")
    check_pack_out(out)
    listing = list_run_data(cfg)  # a bad root or layout fails here, before Ray starts
    connect_ray()
    split = scan_data(cfg, print_fn, listing)
    fs, base = resolve_location(out)
    base = base.rstrip("/")
    files = {}
    for name, samples in (("train", split.train), ("val", split.val)):
        files[name] = _write_files(split.root, name, samples, fs, base, cfg.optim.seed, rows_per_file)
        print_fn(f"pack: {len(samples)} {name} images in {len(files[name])} file(s)")
    write_split(split, f"{out.rstrip('/')}/{PACK_SPLIT}")
    holdout = all(c.split is None for c in listing.candidates)
    pack = Pack(out, split.fingerprint(), cfg.data.val_fraction if holdout else None,
                cfg.optim.seed if holdout else None, files["train"], files["val"])
    with fs.open_output_stream(f"{base}/{PACK_JSON}") as stream:  # last: the pack is complete
        stream.write((json.dumps(pack.to_json(), indent=1) + "\n").encode("utf-8"))
    print_fn(f"pack: wrote {out} (split fingerprint {pack.fingerprint[:12]})")
    return pack


def _write_files(root: str, name: str, samples: tuple[Sample, ...], fs, base: str, seed: int,
                 rows_per_file: int) -> tuple[PackFile, ...]:
    """Write one split's rows under ``base/split=<name>/``; its files, ordered by first row."""
    import ray.data

    rows = np.arange(len(samples))
    if name == "train":  # every file a mix of classes: trials shuffle only within a few files
        rows = np.random.default_rng(seed).permutation(rows)
    table = pa.table({
        "row": pa.array(rows, pa.int64()),
        "path": [samples[i].path for i in rows],
        "label": pa.array([samples[i].label for i in rows], pa.int64()),
        "sha1": [samples[i].sha1 for i in rows],
    })
    # One block per file-to-be: Ray Data reads each block's images in a task of its own.
    blocks = [table.slice(start, rows_per_file) for start in range(0, len(rows), rows_per_file)]
    directory = f"{base}/split={name}"
    quiet(ray.data.from_arrow(blocks).map_batches(
        _with_image_bytes, batch_format="pyarrow", batch_size=None, fn_kwargs={"root": root},
    )).write_parquet(directory, filesystem=fs, row_group_size=rows_per_file)
    written = []
    for info in fs.get_file_info(pafs.FileSelector(directory)):
        first = pq.read_table(info.path, filesystem=fs, columns=["row"]).column("row")
        written.append((first[0].as_py(), PackFile(f"split={name}/{info.base_name}", len(first))))
    position = np.argsort(rows)  # where each row stands in the order written
    written.sort(key=lambda pair: position[pair[0]])
    if sum(f.rows for _, f in written) != len(samples):
        raise DataError(f"pack: {sum(f.rows for _, f in written)} {name} rows written under {directory!r}, "
                        f"expected {len(samples)}; pack again into an empty OUT.")
    return tuple(f for _, f in written)


def _with_image_bytes(batch: pa.Table, root: str) -> pa.Table:
    """Ray Data task: ``batch`` with each file's bytes, checked against the scan's sha1."""
    data_root = DataRoot(root)
    images = []
    for path, sha1 in zip(batch.column("path").to_pylist(), batch.column("sha1").to_pylist()):
        data = data_root.read_bytes(path)
        if hashlib.sha1(data).hexdigest() != sha1:
            raise DataError(f"{data_root.path_of(path)} changed since it was scanned (sha1 differs); "
                            "pack again (data.rescan: true reads every image anew).")
        images.append(data)
    return batch.append_column("image", pa.array(images, pa.binary()))

