"""Selection under noise: does tunecv export the best model its search trained?

The data are hard digits (``trainables.data.demo_data.render_hard_digit``) split by glyph:
scikit-learn's 1,797 digits, two glyphs in three for the run and the third for an
independent test set, so no drawing is on both sides. The run's data are imbalanced
(``120 * 0.78**k`` images for digit k, 120 down to 12): with ``data.val_fraction`` 0.2
the two smallest classes hold 2 or 3 validation images. The test set renders each of
its glyphs ``TEST_RENDERINGS`` times with other random draws: over 5,000 images that
nothing in the run saw.

Per seed, one ``tunecv run`` as a user starts it (``--space auto`` without pretrained
weights: ``scratch_lt1k``, its warm-start recipe first, TPE, ASHA, the default
finalists), then every trial's kept best checkpoint is scored on the test set in
PyTorch. Three numbers, as the issue defines them:

- ``exported``: what tunecv exports: the ensemble of the best finalist's runs when its rule
  ships it (``search/export/ensemble.py``, the same code the export runs), else the
  checkpoint ``search.results.winner.best_checkpoint`` names;
- ``oracle``: the best test macro-F1 among all the run's single trials (finalist runs included);
- ``recipe``: the warm-start recipe's trial (the run's first).

``regret`` = oracle - exported; ``gain`` = exported - recipe; and ``top_ranked``: what
ranking by one run's best validation epoch (tunecv before the finalists) would export.
Targets: mean regret <= 0.5 points, mean gain >= 1 point.

    .venv/bin/python -m bench.selection [--seeds 0 1 2] [--cpus 2]
    .venv/bin/python -m bench.selection --smoke --results DIR   # 1 seed, tiny: checks, not numbers
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench._common import REPO, RESULTS, BenchError, load_demo_config, local_ray, machine, write_result

EPOCHS, NUM_SAMPLES, IMAGE_SIZE = 8, 10, 32
TEST_RENDERINGS = 9  # each test glyph drawn this many times: ~600 glyphs -> ~5,400 images
SMOKE = {"epochs": 2, "num_samples": 2, "image_size": 32, "per_class": 12, "renderings": 1}
TARGET_REGRET, TARGET_GAIN = 0.005, 0.01


def write_selection_data(out: Path, image_size: int, run_per_class: int | None = None,
                         renderings: int = TEST_RENDERINGS) -> tuple[Path, Path]:
    """``out/run/<digit>/`` (imbalanced, 2 glyphs in 3) and ``out/test/<digit>/`` (the
    other glyphs, each ``renderings`` times); written once, same bytes every time."""
    import numpy as np
    from sklearn.datasets import load_digits

    from trainables.data.demo_data import render_hard_digit

    run_root, test_root = out / "run", out / "test"
    if run_root.is_dir() and test_root.is_dir():
        return run_root, test_root
    digits = load_digits()
    rng = np.random.default_rng(0)
    kept: dict[int, int] = {}
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        digit = int(target)
        if index % 3 == 0:
            for r in range(renderings):
                path = test_root / str(digit) / f"{index:04d}-{r}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                render_hard_digit(image, rng, image_size).save(path)
            continue
        if kept.get(digit, 0) >= (run_per_class or int(120 * 0.78 ** digit)):
            continue
        path = run_root / str(digit) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_hard_digit(image, rng, image_size).save(path)
        kept[digit] = kept.get(digit, 0) + 1
    return run_root, test_root


def test_split(test_root: Path, class_names: tuple[str, ...]):
    """The test folder as a split's ``test`` part, in the run's class order."""
    from trainables.data.datasets import DataSplit, Sample

    samples = tuple(Sample(f"{name}/{p.name}", label, "")
                    for label, name in enumerate(class_names) for p in sorted((test_root / name).glob("*.png")))
    return DataSplit(str(test_root), class_names, (), (), (), (), samples)


def score_trials(store, split) -> dict[str, float]:
    """Test macro-F1 of every trial's kept best checkpoint."""
    from search.export.scoring import checkpoint_test_report
    from search.results.trials import load_run

    scores = {}
    for trial in load_run(store).trials:
        kept = [rel for rel in trial.checkpoints_by_rank() if (Path(store.location) / rel / "model.safetensors").is_file()]
        if kept:
            scores[trial.trial_id] = checkpoint_test_report(Path(store.location) / kept[0], split)["macro_f1"]
    return scores


FRACTIONS = (0.05, 0.10, 0.15, 0.20, 0.30)  # data.test_fraction values whose test estimate is measured
DRAWS = 300


def predictions(checkpoint: Path, split) -> tuple[list[int], list[int]]:
    """(labels, predicted classes) of a checkpoint on the split's test images, in PyTorch."""
    import torch

    from search.export.scoring import eval_loader
    from trainables.model.checkpoint import load_model

    model, meta = load_model(checkpoint)
    labels, predicted = [], []
    with torch.inference_mode():
        for x, y in eval_loader(split, meta, 256, which="test"):
            predicted += model(x).argmax(1).tolist()
            labels += y.tolist()
    return labels, predicted


def test_fraction_noise(labels, predicted, class_counts: list[int], seed: int = 0) -> dict[str, dict]:
    """How far a test split of ``data.test_fraction`` f of this run's data would put its
    macro-F1 estimate: per f, ``DRAWS`` stratified test splits of the sizes tunecv carves
    (f of each class, at least 1), drawn from the large test set's images of one model,
    and the standard deviation of their macro-F1; with the training images f costs."""
    import numpy as np

    from sklearn.metrics import f1_score

    labels, predicted = np.asarray(labels), np.asarray(predicted)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in range(len(class_counts))]
    result = {}
    for fraction in FRACTIONS:
        sizes = [max(1, round(fraction * n)) for n in class_counts]
        scores = []
        for _ in range(DRAWS):
            pick = np.concatenate([rng.choice(m, size, replace=False) for m, size in zip(members, sizes)])
            scores.append(f1_score(labels[pick], predicted[pick], average="macro",
                                   labels=range(len(class_counts)), zero_division=0))
        # test_images: also the images the split takes from training and validation
        result[f"{fraction:.2f}"] = {"test_images": int(sum(sizes)), "macro_f1_std": float(np.std(scores)),
                                     "macro_f1_mean": float(np.mean(scores))}
    return result


def run_one(seed: int, out: Path, data: tuple[Path, Path], smoke: bool, cpus: int) -> dict:
    from search.results.ranking import rank
    from search.results.trials import load_run
    from search.results.winner import best_checkpoint
    from search.run.driver import run_search
    from trainables.data.split_files import read_split

    run_root, test_root = data
    epochs, samples, size = ((SMOKE["epochs"], SMOKE["num_samples"], SMOKE["image_size"]) if smoke
                             else (EPOCHS, NUM_SAMPLES, IMAGE_SIZE))
    overrides = [
        f"data.root={run_root}", f"data.image_size={size}", "data.test_fraction=0", f"output_dir={out}",
        f"name=selection-{seed}", f"optim.epochs={epochs}", "search.space=auto", f"search.num_samples={samples}",
        f"search.seed={seed}", f"optim.seed={seed}", "search.export=false", "search.time_budget_s=null",
        f"search.max_concurrent_trials={max(1, cpus)}", "search.asha.grace_period=null",
        "search.finalists.k=3", "search.finalists.repeats=2",
    ]
    if smoke:
        # FIFO: both trials complete, so both are finalists whatever ASHA would say.
        overrides += ["search.finalists.k=2", "search.finalists.repeats=1", "search.scheduler=fifo"]
    with local_ray(cpus):
        store = run_search(load_demo_config(overrides), print_fn=lambda *_: None)
    trials = load_run(store).trials
    scores = score_trials(store, test_split(test_root, read_split(Path(store.location) / "split.parquet").class_names))
    exported, _ = best_checkpoint(store)
    searched = [t for t in rank(trials) if t.finalist_of is None and t.trial_id in scores]
    recipe = min(t.trial_id for t in trials)  # the first trial: the warm-start recipe
    problems = [f"{t.trial_id} kept no checkpoint" for t in trials if t.epochs and t.trial_id not in scores]
    if exported not in scores or recipe not in scores or not searched:
        problems.append(f"exported {exported} / recipe {recipe} / ranked trials not all scored: {sorted(scores)}")
    if not smoke and not any(t.finalist_of for t in trials):
        problems.append("the run had no finalists")
    if problems:
        raise BenchError(f"selection measured nothing trustworthy in {store}: " + "; ".join(problems))
    oracle = max(scores.values())
    split = read_split(Path(store.location) / "split.parquet")
    ensemble = measure_ensemble(store, trials, split, test_split(test_root, split.class_names))
    shipped = scores[exported] if not (ensemble and ensemble["shipped"]) else ensemble["test"]
    counts = [sum(1 for smp in (*split.train, *split.val) if smp.label == c) for c in range(len(split.class_names))]
    rel = next(r for t in trials if t.trial_id == exported for r in t.checkpoints_by_rank()
               if (Path(store.location) / r / "model.safetensors").is_file())
    noise = test_fraction_noise(*predictions(Path(store.location) / rel, test_split(test_root, split.class_names)),
                                counts, seed)
    return {
        "seed": seed, "run": str(store.location), "trials": len(trials),
        "validation_images": len(read_split(Path(store.location) / "split.parquet").val),
        "test_images": sum(1 for _ in test_root.rglob("*.png")),
        "exported_trial": exported, "exported": shipped, "best_run_of_winner": scores[exported],
        "ensemble": ensemble, "oracle": oracle,
        "oracle_trial": max(scores, key=scores.get), "recipe": scores[recipe],
        "top_ranked_trial": searched[0].trial_id, "top_ranked": scores[searched[0].trial_id],
        "regret": oracle - shipped, "gain_over_recipe": shipped - scores[recipe],
        "test_macro_f1": scores,
        "test_fraction_noise": noise,
        "validation_macro_f1": {t.trial_id: t.best_epoch["macro_f1"] for t in trials if t.best_epoch},
    }


def measure_ensemble(store, trials, split, test) -> dict | None:
    """The export's ensemble decision on the run's validation split, and the ensemble's
    test macro-F1 (PyTorch), shipped or not; None when the run builds none."""
    from search.export.ensemble import winning_ensemble
    from search.export.scoring import model_test_report

    ensemble = winning_ensemble(store, trials, split)
    if ensemble is None:
        return None
    return {"members": list(ensemble.members), "validation": ensemble.macro_f1,
            "members_validation_mean": ensemble.members_mean, "shipped": ensemble.shipped,
            "test": model_test_report(ensemble.model, ensemble.meta, test)["macro_f1"]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (trials run 1 CPU each)")
    parser.add_argument("--smoke", action="store_true", help="seed 0, 2 trials of 2 epochs on 120 images: checks, not numbers")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds = [0]
    size = SMOKE["image_size"] if args.smoke else IMAGE_SIZE
    data_dir = REPO / "data" / (f"selection_smoke_{size}" if args.smoke else f"selection_{size}")
    data = write_selection_data(data_dir, size, SMOKE["per_class"] if args.smoke else None,
                                SMOKE["renderings"] if args.smoke else TEST_RENDERINGS)
    out = Path(tempfile.mkdtemp(prefix="tunecv-bench-selection-"))
    runs = []
    for seed in args.seeds:
        run = run_one(seed, out, data, args.smoke, args.cpus)
        runs.append(run)
        what = "ensemble" if (run["ensemble"] or {}).get("shipped") else run["exported_trial"]
        print(f"seed {seed}: exported {what} {run['exported']:.4f}, oracle {run['oracle_trial']} "
              f"{run['oracle']:.4f}, recipe {run['recipe']:.4f}, top-ranked {run['top_ranked_trial']} "
              f"{run['top_ranked']:.4f} (test macro-F1 on {run['test_images']} images)", flush=True)
    mean = {k: statistics.mean(r[k] for r in runs) for k in ("exported", "best_run_of_winner", "oracle", "recipe",
                                                             "top_ranked", "regret", "gain_over_recipe")}
    payload = {
        "what": "test macro-F1 (independent glyphs) of what tunecv exports (the finalists' ensemble when shipped), of the best single trial of the run (oracle) "
                "and of the warm-start recipe; regret = oracle - exported",
        "targets": {"mean_regret_at_most": TARGET_REGRET, "mean_gain_over_recipe_at_least": TARGET_GAIN},
        "setup": (f"hard digits {size} px split by glyph; {'smoke' if args.smoke else f'{NUM_SAMPLES} trials'}, "
                  "space auto (scratch), ASHA, default finalists (k 3, repeats 2, ensemble)"),
        "machine": {**machine(), "ray_cpus": args.cpus},
        "runs": runs,
        "mean": mean,
        "test_fraction_noise_mean_std": {f"{f:.2f}": statistics.mean(r["test_fraction_noise"][f"{f:.2f}"]["macro_f1_std"]
                                                                    for r in runs) for f in FRACTIONS},
        "met": {"regret": mean["regret"] <= TARGET_REGRET, "gain": mean["gain_over_recipe"] >= TARGET_GAIN},
    }
    path = write_result("selection", payload, args.results)
    print(f"mean: {mean} -> {path}")
    return path


if __name__ == "__main__":
    main()
