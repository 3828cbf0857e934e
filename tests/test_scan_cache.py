"""The scan cache: a second scan of unchanged data reads no image, a changed file is read
alone, each cache file is written once; and the scan of a bucket as Ray tasks."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from search.config import parse_config
from search.data import scan_data
from search.scan_cache import CACHE_DIR, cached_scan
from tests.conftest import small_run_config
from trainables.data.datasets import list_data, split_scanned


def _scan(root, out, lines=None, **kwargs):
    listing = list_data(root)
    table, stats = cached_scan(str(out), listing, 10**8, (lines.append if lines is not None else lambda *_: None),
                               **kwargs)
    sha1 = dict(zip(table.column("path").to_pylist(), table.column("sha1").to_pylist()))
    return split_scanned(listing, table), stats, sha1


def _cache_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / CACHE_DIR).rglob("*.parquet")}


def _split_of(split, path: str) -> str:
    return "train" if path in {s.path for s in split.train} else "val"


@contextlib.contextmanager
def _nothing():
    yield


def _png(path, seed: int, size: int = 32) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_only_changed_files_are_read_again(synthetic_root, tmp_path):
    root, out = tmp_path / "data", tmp_path / "runs"
    shutil.copytree(synthetic_root, root)
    first, stats, sha1 = _scan(root, out)
    assert (stats.listed, stats.reused, stats.scanned) == (160, 0, 160)
    again, stats, _ = _scan(root, out)
    assert (stats.reused, stats.scanned) == (160, 0)
    assert again.fingerprint() == first.fingerprint()
    written = _cache_files(out)
    assert len(written) == 1  # nothing changed: no new cache file

    changed = root / "class_2" / sorted(os.listdir(root / "class_2"))[0]
    _png(changed, seed=99, size=20)  # new bytes, new size
    _, stats, after = _scan(root, out)
    key = changed.relative_to(root).as_posix()
    assert (stats.reused, stats.scanned) == (159, 1)
    assert after[key] != sha1[key]

    # Same size, new bytes, new mtime: the mtime alone shows the change.
    size = changed.stat().st_size
    data = bytearray(changed.read_bytes())
    _png(changed, seed=98, size=20)
    assert changed.stat().st_size == size and bytes(data) != changed.read_bytes()
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    _, stats, _ = _scan(root, out)
    assert (stats.reused, stats.scanned) == (159, 1)

    # A deleted file drops out; a new one is read alone.
    gone = root / "class_0" / sorted(os.listdir(root / "class_0"))[0]
    gone.unlink()
    _png(root / "class_3" / "new.png", seed=7)
    split, stats, _ = _scan(root, out)
    assert (stats.listed, stats.reused, stats.scanned) == (160, 159, 1)
    paths = {s.path for s in (*split.train, *split.val)}
    assert gone.relative_to(root).as_posix() not in paths and "class_3/new.png" in paths

    # Each cache file is written once: every earlier file is still there, byte for byte.
    now = _cache_files(out)
    assert len(now) == 4 and all(now[name] == data for name, data in written.items())

    _, stats, _ = _scan(root, out, rescan=True)
    assert (stats.reused, stats.scanned) == (0, 160)


def test_a_torn_cache_file_is_passed_over(synthetic_root, tmp_path):
    root, out = tmp_path / "data", tmp_path / "runs"
    shutil.copytree(synthetic_root, root)
    _scan(root, out)
    (newest,) = (out / CACHE_DIR).rglob("*.parquet")
    torn = newest.parent / ("9" * 20 + "-torn.parquet")  # sorts after it: tried first
    torn.write_bytes(newest.read_bytes()[:100])
    _, stats, _ = _scan(root, out)
    assert (stats.reused, stats.scanned) == (160, 0)


def test_run_data_goes_through_the_cache(synthetic_root, tmp_path):
    cfg = parse_config(small_run_config(synthetic_root, tmp_path / "runs"))
    lines: list[str] = []
    first = scan_data(cfg, lines.append)
    second = scan_data(cfg, lines.append)
    assert first == second
    assert any("160 files, 0 from the cache, 160 read" in line for line in lines)
    assert any("160 files, 160 from the cache, 0 read" in line for line in lines)


@pytest.mark.slow
def test_a_bucket_is_scanned_by_ray_tasks_and_cached(synthetic_root, tmp_path, s3_bucket):
    import ray

    prefix = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    fs, base = pafs.FileSystem.from_uri(prefix)
    pafs.copy_files(str(synthetic_root), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    out = tmp_path / "runs"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        lines: list[str] = []
        split, stats, sha1 = _scan(prefix, out, lines)
        assert (stats.listed, stats.scanned) == (160, 160)
        assert any(line.endswith("reading 160 on Ray") for line in lines), lines
        assert any("160/160 files read and decoded" in line for line in lines), lines
        _, stats, _ = _scan(prefix, out)
        assert (stats.reused, stats.scanned) == (160, 0)
        key = sorted(sha1)[0]
        with fs.open_output_stream(f"{base}/{key}") as stream:
            stream.write(open(synthetic_root / sorted(sha1)[1], "rb").read())
        with pytest.warns(UserWarning) if _split_of(split, key) != _split_of(split, sorted(sha1)[1]) else _nothing():
            _, stats, after = _scan(prefix, out)
        assert (stats.reused, stats.scanned) == (159, 1)
        assert after[key] == sha1[sorted(sha1)[1]]  # now a copy of the next file
    finally:
        ray.shutdown()
