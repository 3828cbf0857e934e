"""Size and build time of ``report.html`` for a 200-trial search.

A benchmark, not a test: it writes a synthetic run of ``--trials`` trials (``bench/
synthetic_run.py``: a real space's parameters, ASHA stops, failures, three trials still
running, a ``metrics.json`` per trial) and times ``build_report`` (reading the run,
ranking, every figure, the page) plus writing the three report files, ``--repeats``
times. Targets: under 5 s to write, under 5 MB. It refuses to write a result when the
page lacks a trial row or a plot.

    .venv/bin/python -m bench.report_html [--trials 200] [--repeats 5]
    .venv/bin/python -m bench.report_html --smoke --results DIR   # 12 trials, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import RESULTS, BenchError, machine, write_result
from bench.synthetic_run import write_synthetic_run

MAX_SECONDS, MAX_BYTES = 5.0, 5_000_000


def main(argv: list[str] | None = None) -> Path:
    from search.layout import REPORT_HTML
    from search.results.report import build_report
    from search.results.trials import load_run
    from search.storage import RunStore

    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="12 trials, one repeat: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    trials, repeats = (12, 1) if args.smoke else (args.trials, args.repeats)
    with tempfile.TemporaryDirectory(prefix="tunecv-bench-") as tmp:
        run = write_synthetic_run(Path(tmp) / "runs" / "synthetic-20261130-000000", trials, running=3, finished=False)
        times, size, html = [], 0, ""
        for i in range(repeats):
            out = RunStore.at(Path(tmp) / f"out{i}")
            start = time.perf_counter()
            report = build_report(load_run(run))
            report.write_to(out)
            times.append(time.perf_counter() - start)
            size, html = Path(out.fs_path(REPORT_HTML)).stat().st_size, report.html
    rows, plots = html.count("<tr class="), html.count('<div class="plot"')
    if rows != trials or plots < 8:
        raise BenchError(f"the page shows {rows} trial rows of {trials} and {plots} plots")
    seconds = statistics.median(times)
    result = {
        "trials": trials, "repeats": repeats, "seconds_median": round(seconds, 3),
        "seconds_all": [round(t, 3) for t in times], "bytes": size, "plots": plots,
        "targets": {"seconds": MAX_SECONDS, "bytes": MAX_BYTES,
                    "seconds_met": seconds < MAX_SECONDS, "bytes_met": size < MAX_BYTES},
        "machine": machine(), "smoke": args.smoke,
    }
    path = write_result("report_html", result, args.results)
    print(f"report.html for {trials} trials: {seconds:.2f} s (median of {repeats}), {size / 1e6:.2f} MB, "
          f"{plots} plots -> {path}")
    return path


if __name__ == "__main__":
    main()
