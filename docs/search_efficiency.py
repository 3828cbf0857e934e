"""Draws docs/search-efficiency.png from the committed bench/results/search_efficiency_grace4.json.

The picture is the benchmark's own curves (best validation macro-F1 so far against epochs
spent, per seed), so the docs show a search without running one: a live search needs Ray,
and the numbers here are the ones docs/benchmarks.md quotes. matplotlib is not a tunecv
dependency; it comes with the test extra (mlflow's server needs it):

    .venv/bin/python docs/search_efficiency.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "bench" / "results" / "search_efficiency_grace4.json"
OUT = REPO / "docs" / "search-efficiency.png"

# The three methods the grace-4 result holds; random+FIFO, the baseline, drawn wide and underneath.
METHODS = {
    "random_fifo": ("random+FIFO (5 trials, 40 epochs)", "#2ca02c", 3.0),
    "tpe_asha": ("TPE+ASHA (12 trials)", "#ff7f0e", 1.6),
    "tpe_asha_warm": ("TPE+ASHA, warm start (the default)", "#1f77b4", 1.6),
}


def main() -> None:
    result = json.loads(SOURCE.read_text())
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(11, 3.6), sharey=True)
    for ax, run in zip(axes, runs):
        for key, (label, colour, width) in METHODS.items():
            curve = run["curves"][key]
            ax.step(range(1, len(curve) + 1), curve, where="post", color=colour, linewidth=width, label=label,
                    alpha=0.55 if width > 2 else 1.0)
        # What the benchmark asks of TPE+ASHA: reach random+FIFO's 40-epoch best in a third of 40.
        ax.axhline(run["target"], color="black", linewidth=0.6, label="random+FIFO's best")
        ax.axvline(run["target_epochs"] / 3, color="black", linewidth=0.6, linestyle=(0, (2, 3)),
                   label="a third of its 40 epochs")
        ax.set_title(f"seed {run['seed']}: random+FIFO's best {run['target']:.3f}", fontsize=10)
        ax.set_xlabel("epochs spent (all trials)")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best validation macro-F1 so far")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"Search on hard digits, space scratch_lt10k, ASHA grace 4 ({SOURCE.name}, {result['commit'][:7]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
