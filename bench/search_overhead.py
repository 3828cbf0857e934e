"""Per-trial fixed overhead of a local search: trial wall time minus its epochs' compute.

Wall time is taken in the driver, from Tune's trial start to its completion, so it
includes the trial actor, imports, model and loader construction, checkpointing and
reporting. Compute is the sum of the trial's ``epoch_time_s`` (training + validation).
Target: median overhead <= 2 s.

    .venv/bin/python bench/search_overhead.py [--trials 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import digits_root, load_demo_config, machine, write_result
from ray import tune

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


def main() -> None:
    import ray

    from search.results.trials import load_run
    from search.run.driver import run_search

    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="tunecv-bench-"))
    cfg = load_demo_config([
        f"data.root={digits_root(32)}", "data.image_size=32", f"output_dir={out}",
        "optim.epochs=2", "search.scheduler=fifo", f"search.num_samples={args.trials}",
        "search.max_concurrent_trials=2", "search.export=false", "search.time_budget_s=null",
    ])
    clock = TrialClock()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        store = run_search(cfg, print_fn=lambda *_: None, callbacks=[clock])
    finally:
        ray.shutdown()
    epochs = {t.trial_id: t.epochs for t in load_run(store).trials}
    trials = []
    for trial_id, end in clock.end.items():
        compute = sum(e["epoch_time_s"] for e in epochs[trial_id])
        wall = end - clock.start[trial_id]
        trials.append({"trial_id": trial_id, "wall_s": wall, "compute_s": compute, "overhead_s": wall - compute})
    median = statistics.median(t["overhead_s"] for t in trials)
    # With reuse_actors, the first trial on each of the 2 concurrent slots starts a
    # process (cold); later ones reuse it (warm). Both are reported.
    by_start = sorted(trials, key=lambda t: clock.start[t["trial_id"]])
    cold, warm = by_start[:2], by_start[2:]
    payload = {
        "what": "per-trial overhead = Tune trial wall time (driver clock) - sum of epoch compute",
        "setup": "digits 32 px, demo space, 2 epochs, FIFO, 2 concurrent trials, 1 CPU each",
        "machine": machine(),
        "trials": trials,
        "median_overhead_s": median,
        "cold_overhead_s": [round(t["overhead_s"], 3) for t in cold],
        "warm_median_overhead_s": statistics.median(t["overhead_s"] for t in warm) if warm else None,
        "target_s": TARGET_S,
        "meets_target": median <= TARGET_S,
    }
    path = write_result("search_overhead", payload)
    for t in trials:
        print(f"{t['trial_id']}: wall {t['wall_s']:.2f} s, compute {t['compute_s']:.2f} s, overhead {t['overhead_s']:.2f} s")
    print(f"median overhead {median:.2f} s (target <= {TARGET_S} s) -> {path}")


if __name__ == "__main__":
    main()
