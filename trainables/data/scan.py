"""The scan: read every listed file once, hash it (for the leakage check) and decode it
fully (to skip bad files before any trial), on a thread pool or as Ray tasks across the
cluster. One row per file, keyed by (path, size, mtime_ns), so that a cache of rows
(``search/scan_cache.py``) can tell which files changed since.

Not Ray Data's ``read_binary_files``: given a list of paths, it fetches each one's
metadata on the driver first (one request per object), which is the serial cost the
distributed scan is there to avoid. Plain tasks over chunks of the listing are enough.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Sequence

import pyarrow as pa

from trainables.data.images import DEFAULT_MAX_PIXELS, scan_images
from trainables.data.roots import DataRoot, FileEntry

# Bumped whenever what a row means changes (decode rules, hash), so old caches are not read.
SCAN_VERSION = 1
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("sha1", pa.string()),  # null for a bad file
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bad_reason", pa.string()),  # null for a usable image
])
_CHUNK_FILES = 500  # per Ray task: S3 GETs of a few KB each, a few seconds of work
_PROGRESS_EVERY_S = 2.0

Progress = Callable[[int, int], None]  # (files scanned so far, files to scan)


def scan_entries(location: str, entries: Sequence[FileEntry], max_pixels: int = DEFAULT_MAX_PIXELS,
                 num_threads: int | None = None) -> pa.Table:
    """Scan ``entries`` of the root at ``location``; one row each, in order."""
    root = DataRoot(location)
    good, bad = scan_images([entry.path for entry in entries], max_pixels=max_pixels, num_threads=num_threads,
                            read=root.read_bytes)
    found = {image.path: (image.sha1, image.width, image.height, None) for image in good}
    found.update({image.path: (None, None, None, image.reason) for image in bad})
    rows = [found[entry.path] for entry in entries]
    return pa.table({
        "path": [entry.path for entry in entries],
        "size": [entry.size for entry in entries],
        "mtime_ns": [entry.mtime_ns for entry in entries],
        "sha1": [row[0] for row in rows],
        "width": [row[1] for row in rows],
        "height": [row[2] for row in rows],
        "bad_reason": [row[3] for row in rows],
    }, schema=SCHEMA)


def scan_all(root: DataRoot, entries: Sequence[FileEntry], max_pixels: int = DEFAULT_MAX_PIXELS,
             progress: Progress | None = None) -> pa.Table:
    """Scan ``entries``: as Ray tasks when this process is connected to Ray (each task
    opens the root itself; a task lost with its node is retried by Ray), else on this
    process's threads. Rows come back in the order of ``entries``."""
    if not entries:
        return SCHEMA.empty_table()
    if not on_ray():
        tables = []
        for start in range(0, len(entries), _CHUNK_FILES):
            tables.append(scan_entries(root.location, entries[start:start + _CHUNK_FILES], max_pixels))
            if progress:
                progress(min(len(entries), start + _CHUNK_FILES), len(entries))
        return pa.concat_tables(tables)
    return _scan_on_ray(root, entries, max_pixels, progress)


def on_ray() -> bool:
    """Whether this process is connected to Ray (without importing Ray, a 2 s import)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _scan_on_ray(root: DataRoot, entries: Sequence[FileEntry], max_pixels: int,
                 progress: Progress | None) -> pa.Table:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small sets still spread over the cluster; large ones in chunks of _CHUNK_FILES.
    size = max(16, min(_CHUNK_FILES, math.ceil(len(entries) / (2 * cpus))))
    chunks = [entries[start:start + size] for start in range(0, len(entries), size)]
    # One thread per task: the task holds one CPU, and decoding is CPU work.
    task = ray.remote(num_cpus=1)(scan_entries)
    results: dict[int, pa.Table] = {}
    pending: dict = {}
    next_chunk, done_files, last_print = 0, 0, time.monotonic()
    while next_chunk < len(chunks) or pending:
        # About two tasks per CPU in flight: busy workers, and a bounded object store.
        while next_chunk < len(chunks) and len(pending) < 2 * cpus:
            ref = task.remote(root.location, chunks[next_chunk], max_pixels, 1)
            pending[ref] = next_chunk
            next_chunk += 1
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=_PROGRESS_EVERY_S)
        for ref in ready:
            index = pending.pop(ref)
            results[index] = ray.get(ref)
            done_files += len(chunks[index])
        finished = not pending and next_chunk == len(chunks)
        if progress and (finished or time.monotonic() - last_print >= _PROGRESS_EVERY_S):
            progress(done_files, len(entries))
            last_print = time.monotonic()
    return pa.concat_tables([results[i] for i in range(len(chunks))])
