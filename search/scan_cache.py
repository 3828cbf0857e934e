"""The scan cache: what the scan found for each file of a data root, kept under
``<output_dir>/scan-cache/`` so that the next search or retrain of the same snapshot reads
no image twice, and a changed snapshot rescans only the files that changed.

Ray and pyarrow have no cache of per-file results keyed by a listing, which is the gap
this fills. A file is identified by (path, size, mtime_ns) from the listing alone: an
ETag would cost one request per object (10^6 for a large bucket). The limit: S3's
LastModified has one-second resolution, so a same-size overwrite within the second of
the scanned version goes unseen; ``data.rescan: true`` scans everything again.

Layout: ``scan-cache/<key>/<time_ns>-<listing fingerprint>.parquet``, where ``key`` names
the root, the pixel limit and the scan's version. Each file is written once and never
modified; concurrent searches write files of their own. The newest file of a key is
the one reused from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainables.data.datasets import Listing
from trainables.data.locations import resolve_location
from trainables.data.scan import SCAN_VERSION, SCHEMA, on_ray, scan_all

CACHE_DIR = "scan-cache"


@dataclass(frozen=True)
class ScanStats:
    listed: int
    reused: int  # rows taken from the cache
    scanned: int  # files read and decoded now
    seconds: float


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()[:16]


def cache_dir(output_dir: str, listing: Listing, max_pixels: int) -> str:
    """Where the scans of this root, at this pixel limit, are kept."""
    return f"{output_dir.rstrip('/')}/{CACHE_DIR}/{_digest([listing.root.location, max_pixels, SCAN_VERSION])}"


def cached_scan(output_dir: str, listing: Listing, max_pixels: int, print_fn=print,
                rescan: bool = False) -> tuple[pa.Table, ScanStats]:
    """Scan ``listing``'s files, reusing the rows of unchanged files from the cache, and
    write the result as a new cache file. Scans on Ray when this process is connected.

    Returns:
        One row per listed file (``trainables.data.scan.SCHEMA``), and what was reused.
    """
    started = time.monotonic()
    entries = listing.entries
    fingerprint = _digest(sorted(entries))
    fs, base = resolve_location(cache_dir(output_dir, listing, max_pixels))
    previous = SCHEMA.empty_table() if rescan else _newest(fs, base)
    known = {}
    if previous.num_rows:
        columns = [previous.column(name).to_pylist() for name in ("path", "size", "mtime_ns")]
        known = {row: index for index, row in enumerate(zip(*columns))}
    hits = [known[entry] for entry in entries if entry.size >= 0 and entry in known]
    misses = [entry for entry in entries if not (entry.size >= 0 and entry in known)]

    def progress(done: int, total: int) -> None:
        rate = done / max(1e-9, time.monotonic() - scan_started)
        print_fn(f"scan: {done}/{total} files read and decoded ({rate:.0f} files/s)")

    scan_started = time.monotonic()
    if misses:
        print_fn(f"scan: {len(entries)} files listed, {len(hits)} unchanged since the cached scan; "
                 f"reading {len(misses)}" + (" on Ray" if on_ray() else ""))
    fresh = scan_all(listing.root, misses, max_pixels, progress)
    table = pa.concat_tables([previous.take(pa.array(hits, pa.int64())), fresh]) if hits else fresh
    if misses or not previous.num_rows:
        try:
            _write_once(fs, base, f"{time.time_ns():020d}-{fingerprint}.parquet", table)
        except OSError as err:  # a cache, not the run's data: a full disk fails the run later, by name
            print_fn(f"scan: not cached ({err}); the next search of this data reads it again")
    stats = ScanStats(len(entries), len(hits), len(misses), time.monotonic() - started)
    print_fn(f"scan: {stats.listed} files, {stats.reused} from the cache, {stats.scanned} read, "
             f"in {stats.seconds:.1f} s")
    return table, stats


def _newest(fs, base: str) -> pa.Table:
    """The newest readable cache file of a key; an empty table when there is none."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return SCHEMA.empty_table()
    names = sorted((info.path for info in infos if info.path.endswith(".parquet")), reverse=True)
    for path in names:
        try:
            table = pq.read_table(path, filesystem=fs, schema=SCHEMA)
        except (OSError, pa.ArrowException):
            continue  # torn by a crash mid-write (local): the one before it is as good
        return table
    return SCHEMA.empty_table()


def _write_once(fs, base: str, name: str, table: pa.Table) -> None:
    """Write ``base/name``; locally via a temporary file and a rename, so that a reader
    never sees half a file (an object store's PUT is whole already)."""
    fs.create_dir(base, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, f"{base}/{name}", filesystem=fs)
        return
    temporary = f"{base}/.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temporary, filesystem=fs)
        fs.move(temporary, f"{base}/{name}")
    except OSError:
        with contextlib.suppress(OSError):
            fs.delete_file(temporary)
        raise
