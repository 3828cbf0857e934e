"""Per-trial fixed overhead of a local search: trial wall time minus its epochs' compute.

Wall time comes from the trial's own record: the study's clock from the ask to the end,
which includes starting the trial's actor, imports, model and loader construction,
checkpointing and reporting. A second, independent clock in the driver runs from Tune's
trial start to its completion; it leaves out the actor's start, so the two agree on
trials that reuse an actor and differ by the start-up on the first trial of each slot.
Compute is the sum of the trial's ``epoch_time_s`` (training + validation).
Target: median overhead <= 2 s.

Before it writes anything it checks what it read: every trial Tune ran is matched to
its records by run-level id, every compute is above zero, and there are as many trials
as asked for. A benchmark that measured nothing raises ``BenchError`` instead of
writing a result (a renamed key once made every compute 0.00 s and the median 9.6 s).

    .venv/bin/python -m bench.search_overhead [--trials 6]
    .venv/bin/python -m bench.search_overhead --smoke --results DIR   # 3 tiny trials (tests)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ray import tune

from bench._common import RESULTS, BenchError, digits_root, load_demo_config, local_ray, machine, smoke_root, write_result
from search.study import TRIAL_ID_KEY

TARGET_S = 2.0


class TrialClock(tune.Callback):
    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.start[trial.config[TRIAL_ID_KEY]] = time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.end[trial.config[TRIAL_ID_KEY]] = time.perf_counter()


def measured_trials(clock: TrialClock, views, asked: int) -> list[dict]:
    """Each trial's wall time, compute and overhead by its record's clock and by Tune's;
    raises ``BenchError`` on anything unmatched."""
    by_id = {view.trial_id: view for view in views}
    problems = []
    if not (len(clock.start) == len(clock.end) == len(by_id) == asked):
        problems.append(f"{asked} trials asked for; Tune started {len(clock.start)}, completed {len(clock.end)}; "
                        f"the study holds {len(by_id)}")
    trials = []
    for trial_id, end in sorted(clock.end.items()):
        view = by_id.get(trial_id)
        compute = sum(e["epoch_time_s"] for e in view.epochs) if view else 0.0
        if view is None or compute <= 0:
            problems.append(f"trial {trial_id}: {'no record' if view is None else 'no epoch compute recorded'}")
            continue
        tune_wall = end - clock.start[trial_id]
        trials.append({"trial_id": trial_id, "wall_s": view.wall_time_s, "compute_s": compute,
                       "overhead_s": view.wall_time_s - compute, "tune_wall_s": tune_wall,
                       "tune_overhead_s": tune_wall - compute})
    if problems:
        raise BenchError("search_overhead measured nothing trustworthy: " + "; ".join(problems))
    return trials


def main(argv: list[str] | None = None) -> Path:
    from search.results.trials import load_run
    from search.run.driver import run_search

    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--smoke", action="store_true",
                        help="3 trials of 1 epoch on 160 synthetic images at 16 px: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    trials_asked, epochs, size = (3, 1, 16) if args.smoke else (args.trials, 2, 32)
    root = smoke_root() if args.smoke else digits_root(size)
    out = Path(tempfile.mkdtemp(prefix="tunecv-bench-"))
    cfg = load_demo_config([
        f"data.root={root}", f"data.image_size={size}", f"output_dir={out}",
        f"optim.epochs={epochs}", "search.scheduler=fifo", f"search.num_samples={trials_asked}",
        "search.max_concurrent_trials=2", "search.export=false", "search.time_budget_s=null",
    ])
    clock = TrialClock()
    with local_ray():
        store = run_search(cfg, print_fn=lambda *_: None, callbacks=[clock])
    trials = measured_trials(clock, load_run(store).trials, trials_asked)
    median = statistics.median(t["overhead_s"] for t in trials)
    # With reuse_actors, the first trial on each of the 2 concurrent slots starts a
    # process (cold); later ones reuse it (warm). Both are reported.
    by_start = sorted(trials, key=lambda t: clock.start[t["trial_id"]])
    cold, warm = by_start[:2], by_start[2:]
    for trial in by_start:
        trial["warm"] = trial in warm
    payload = {
        "what": "per-trial overhead = Tune trial wall time (driver clock) - sum of epoch compute",
        "setup": f"{'synthetic' if args.smoke else 'digits'} {size} px, demo space, {epochs} epoch(s), FIFO, 2 concurrent trials, 1 CPU each"
                 + (" (smoke)" if args.smoke else ""),
        "machine": machine(),
        "trials": trials,
        "median_overhead_s": median,
        "median_tune_overhead_s": statistics.median(t["tune_overhead_s"] for t in trials),
        "cold_overhead_s": [round(t["overhead_s"], 3) for t in cold],
        "warm_median_overhead_s": statistics.median(t["overhead_s"] for t in warm) if warm else None,
        "target_s": TARGET_S,
        "meets_target": median <= TARGET_S,
    }
    path = write_result("search_overhead", payload, args.results)
    for t in trials:
        print(f"{t['trial_id']}: wall {t['wall_s']:.2f} s, compute {t['compute_s']:.2f} s, overhead {t['overhead_s']:.2f} s")
    print(f"median overhead {median:.2f} s (target <= {TARGET_S} s) -> {path}")
    return path


if __name__ == "__main__":
    main()
