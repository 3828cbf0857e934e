"""Search efficiency: best macro-F1 against epochs spent, for TPE and random sampling,
each with ASHA and with FIFO (every trial runs every epoch).

The task is the generated "hard digits" (``trainables.data.demo_data.write_hard_digits``:
rotated, scaled, shifted, noisy, imbalanced 4.4x; 32 px, 957 images), where the
recipes of the from-scratch space lie far apart. The space is ``scratch_lt10k``, what
``--space auto`` picks without pretrained weights, with its warm start off so only the
sampler and scheduler differ. Every epoch any trial finishes is one unit of budget; a
curve is the best validation macro-F1 after each epoch spent, in the order epochs
finished. Per seed it reports how many epochs each method needed to reach random+FIFO's
best over its whole budget, and the space's warm-start recipe trained alone.

    .venv/bin/python -m bench.search_efficiency [--seeds 0 1 2] [--methods tpe_asha ...] [--grace 2] [--name N]
    .venv/bin/python -m bench.search_efficiency --smoke --results DIR   # tpe_asha and random_fifo, tiny (tests)

Before it writes, it checks each search: as many trials as asked for, FIFO trials
every epoch, macro-F1 values in [0, 1]; otherwise it raises ``BenchError``.

The committed results: ``search_efficiency_grace2.json`` (all methods, ``--grace 2``)
and ``search_efficiency_grace4.json`` (``--grace 4 --methods tpe_asha tpe_asha_warm``;
4 is half of the 8 epochs, tunecv's default since).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench._common import REPO, RESULTS, BenchError, load_demo_config, local_ray, machine, smoke_root, write_result

EPOCHS = 8
METHODS = {
    # FIFO trials each run all 8 epochs; ASHA trials mostly stop at a rung, so ASHA gets
    # more of them for a similar budget. Only "tpe_asha_warm" (what `tunecv run` does by
    # default) and the recipe run the space's warm-start recipe.
    "tpe_asha": {"searcher": "tpe", "scheduler": "asha", "num_samples": 12},
    "tpe_fifo": {"searcher": "tpe", "scheduler": "fifo", "num_samples": 5},
    "random_asha": {"searcher": "random", "scheduler": "asha", "num_samples": 12},
    "random_fifo": {"searcher": "random", "scheduler": "fifo", "num_samples": 5},
    "tpe_asha_warm": {"searcher": "tpe", "scheduler": "asha", "num_samples": 12, "warm_start": True},
    "warm_start_recipe": {"searcher": "tpe", "scheduler": "fifo", "num_samples": 1, "warm_start": True},
}
BASELINE = "random_fifo"  # the epochs target: reach its best with a third of its epochs
# --smoke: 4 synthetic classes at 16 px, 2 epochs, 3 ASHA or 2 FIFO trials a search
SMOKE_EPOCHS, SMOKE_SAMPLES = 2, {"asha": 3, "fifo": 2}


def hard_digits_root() -> Path:
    from trainables.data.demo_data import write_hard_digits

    root = REPO / "data" / "hard_digits_32"
    if not root.is_dir():
        write_hard_digits(root, image_size=32)
    return root


def best_curve(store, asked: int, epochs_each: int | None) -> list[float]:
    """Best macro-F1 after each epoch spent, across all trials, in finishing order; checks
    there are ``asked`` trials, each with ``epochs_each`` epochs when that is given (FIFO)."""
    from search.results.trials import load_run

    trials = load_run(store).trials
    epochs = [e for t in trials for e in t.epochs]
    problems = []
    if len(trials) != asked:
        problems.append(f"{asked} trials asked for, the study holds {len(trials)}")
    if epochs_each is not None and any(len(t.epochs) != epochs_each for t in trials):
        problems.append(f"FIFO trials ran {sorted(len(t.epochs) for t in trials)} epochs, not {epochs_each} each")
    if not epochs or not all(0.0 <= e["macro_f1"] <= 1.0 for e in epochs):
        problems.append("no epochs, or a macro-F1 outside [0, 1]")
    if problems:
        raise BenchError(f"search_efficiency measured nothing trustworthy in {store}: " + "; ".join(problems))
    curve, best = [], 0.0
    for epoch in sorted(epochs, key=lambda e: e["timestamp"]):
        best = max(best, epoch["macro_f1"])
        curve.append(best)
    return curve


def run_one(method: str, seed: int, out: Path, grace: int | None, smoke: bool = False) -> list[float]:
    from search.run.driver import run_search

    m = METHODS[method]
    epochs, samples = (SMOKE_EPOCHS, SMOKE_SAMPLES[m["scheduler"]]) if smoke else (EPOCHS, m["num_samples"])
    root, size = (smoke_root(), 16) if smoke else (hard_digits_root(), 32)
    cfg = load_demo_config([
        f"data.root={root}", f"data.image_size={size}", f"output_dir={out}", f"name={method}-{seed}",
        f"optim.epochs={epochs}", "search.space=scratch_lt10k",
        f"search.searcher={m['searcher']}", f"search.scheduler={m['scheduler']}",
        f"search.num_samples={samples}", f"search.seed={seed}", f"optim.seed={seed}",
        f"search.asha.grace_period={'null' if grace is None else grace}",
        f"search.warm_start={m.get('warm_start', False)}",
        "search.export=false", "search.time_budget_s=null",
    ])
    with local_ray():
        store = run_search(cfg, print_fn=lambda *_: None)
    return best_curve(store, samples, epochs if m["scheduler"] == "fifo" else None)


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, best in enumerate(curve) if best >= target), None)


def mean_best_after_epochs(runs: list[dict], methods: list[str], epochs: int) -> dict[str, dict[int, float]]:
    """The curves in short: mean best-so-far over seeds after 8, 16, ... 48 epochs (a
    method whose budget ran out sooner keeps its last value)."""
    return {m: {n: statistics.mean(r["curves"][m][min(n, len(r["curves"][m])) - 1] for r in runs)
                for n in range(epochs, 6 * epochs + 1, epochs)} for m in methods}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--grace", type=int, help="ASHA grace period in epochs (default: tunecv's, half of them)")
    parser.add_argument("--name", default="search_efficiency", help="<results>/<name>.json")
    parser.add_argument("--smoke", action="store_true",
                        help="seed 0, tpe_asha and random_fifo, 2 epochs on 160 synthetic images: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.methods = [0], ["tpe_asha"]
    epochs = SMOKE_EPOCHS if args.smoke else EPOCHS
    methods = list(dict.fromkeys([*args.methods, BASELINE]))
    out = Path(tempfile.mkdtemp(prefix="tunecv-bench-"))
    runs = []
    for seed in args.seeds:
        curves = {m: run_one(m, seed, out, args.grace, args.smoke) for m in methods}
        target = curves[BASELINE][-1]
        reach = {m: epochs_to_reach(curves[m], target) for m in methods}
        runs.append({
            "seed": seed, "target": target, "target_epochs": len(curves[BASELINE]),
            "epochs_to_reach_target": reach,
            "final_best": {m: c[-1] for m, c in curves.items()},
            "epochs_spent": {m: len(c) for m, c in curves.items()},
            "curves": curves,
        })
        print(f"seed {seed}: {BASELINE} best {target:.4f} in {len(curves[BASELINE])} epochs; reached after "
              + ", ".join(f"{m} {r}" for m, r in reach.items())
              + "; final " + ", ".join(f"{m} {c[-1]:.4f}/{len(c)} ep" for m, c in curves.items()), flush=True)
    ratios = {m: [r["epochs_to_reach_target"][m] / r["target_epochs"] if r["epochs_to_reach_target"][m] else None
                  for r in runs] for m in methods}
    payload = {
        "what": f"best val macro-F1 against epochs spent; epochs each method needs to reach {BASELINE}'s "
                "full-budget best, as a fraction of its epochs (target for TPE+ASHA: at most 1/3)",
        "setup": ("synthetic 16 px (smoke)" if args.smoke else "hard digits 32 px")
                 + f", space scratch_lt10k, {epochs} epochs max, "
                 f"ASHA grace {args.grace or max(1, epochs // 2)} reduction 2, 2 concurrent trials of 1 CPU",
        "methods": {m: METHODS[m] for m in methods},
        "machine": machine(),
        "runs": runs,
        "mean_final_best": {m: statistics.mean(r["final_best"][m] for r in runs) for m in methods},
        "mean_best_after_epochs": mean_best_after_epochs(runs, methods, epochs),
        "epoch_ratio_to_reach_target": ratios,
    }
    path = write_result(args.name, payload, args.results)
    print(f"mean final best: {payload['mean_final_best']}; epoch ratios {ratios} -> {path}")
    return path


if __name__ == "__main__":
    main()
