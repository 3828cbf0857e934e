"""Search efficiency: best macro-F1 against epochs spent, TPE+ASHA vs random search.

For each seed both searches run on the bundled digits with the same space and no warm
start (so only the sampler and scheduler differ). Every epoch any trial finishes is
one unit of budget; the curve is the best validation macro-F1 reached after each epoch
spent, in the order epochs finished. The two are compared at the same budget: the
smaller of the two totals.

    .venv/bin/python bench/search_efficiency.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench._common import digits_root, load_demo_config, machine, write_result

METHODS = {
    # (searcher, scheduler, num_samples): random gets fewer samples because each runs
    # every epoch; the comparison is at equal epochs spent, not equal trial counts.
    "tpe_asha": ("tpe", "asha", 10),
    "random_fifo": ("random", "fifo", 5),
}


def best_curve(store) -> list[float]:
    """Best macro-F1 after each epoch spent, across all trials, in finishing order."""
    from search.results.trials import load_run

    epochs = [e for t in load_run(store).trials for e in t.epochs]
    curve, best = [], 0.0
    for epoch in sorted(epochs, key=lambda e: e["timestamp"]):
        best = max(best, epoch["macro_f1"])
        curve.append(best)
    return curve


def run_one(method: str, seed: int, out: Path) -> list[float]:
    import ray

    from search.run.driver import run_search

    searcher, scheduler, samples = METHODS[method]
    cfg = load_demo_config([
        f"data.root={digits_root(32)}", "data.image_size=32", f"output_dir={out}", f"name={method}-{seed}",
        "optim.epochs=3", "optim.warmup_epochs=0.3", f"search.searcher={searcher}",
        f"search.scheduler={scheduler}", f"search.num_samples={samples}", f"search.seed={seed}",
        "search.asha.grace_period=1", "search.warm_start=false", "search.export=false",
        "search.time_budget_s=null",
    ])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        return best_curve(run_search(cfg, print_fn=lambda *_: None))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="tunecv-bench-"))
    runs = []
    for seed in args.seeds:
        curves = {m: run_one(m, seed, out) for m in METHODS}
        budget = min(len(c) for c in curves.values())
        at_budget = {m: c[budget - 1] for m, c in curves.items()}
        runs.append({"seed": seed, "budget_epochs": budget, "best_at_budget": at_budget, "curves": curves})
        print(f"seed {seed}: at {budget} epochs " + ", ".join(f"{m} {v:.4f}" for m, v in at_budget.items()))
    summary = {m: statistics.mean(r["best_at_budget"][m] for r in runs) for m in METHODS}
    wins = sum(r["best_at_budget"]["tpe_asha"] >= r["best_at_budget"]["random_fifo"] for r in runs)
    payload = {
        "what": "best val macro-F1 after the same number of epochs spent, per seed",
        "setup": "digits 32 px, demo space without warm start, 3 epochs max, 2 concurrent trials",
        "methods": {m: dict(zip(("searcher", "scheduler", "num_samples"), v)) for m, v in METHODS.items()},
        "machine": machine(),
        "runs": runs,
        "mean_best_at_budget": summary,
        "tpe_asha_wins_or_ties": f"{wins}/{len(runs)}",
    }
    path = write_result("search_efficiency", payload)
    print(f"mean best macro-F1 at equal budget: {summary}; TPE+ASHA >= random in {wins}/{len(runs)} seeds -> {path}")


if __name__ == "__main__":
    main()
