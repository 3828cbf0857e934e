"""What the hash holdout costs and buys against a stratified draw: class balance in
validation, and how many images of a grown snapshot's validation and test splits an old
model trained on.

Both rules run side by side on the same file lists (paths only: the rules never read an
image): sklearn's ``train_test_split(stratify=...)``, as tunecv drew validation before,
and ``trainables.data.holdout.carve_val``. The test split is carved first by
``carve_test`` for both, as a run does (``data.test_fraction`` 0.15, ``val_fraction`` 0.2).

- Balance: per class, the validation share minus 0.2, in points, over 50 seeds.
- Stability: snapshot v1 holds the first 60 % of each class's files, v2 all of them (as
  issue 26's retrain probe grew digits); the images of v2's validation and test splits
  that v1's split had trained on.

Data shapes: scikit-learn's digits (10 classes of 174-183), and a 12-class set with a
20:1 imbalance (240 down to 12 images), the shape on which selection was noisiest.

It refuses to write a result in which the hash rule left any such image in v2's
held-out splits: that is the property the rule exists for.

    .venv/bin/python -m bench.split_balance [--results DIR]
    .venv/bin/python -m bench.split_balance --smoke --results DIR   # 5 seeds (tests)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench._common import RESULTS, BenchError, machine, write_result

VAL_FRACTION = 0.2
TEST_FRACTION = 0.15
SEEDS = 50


@dataclass(frozen=True)
class Item:
    path: str
    label: int


def _items(sizes: list[int], share: float = 1.0) -> list[Item]:
    return [Item(f"{label}/{index:04d}.png", label) for label, size in enumerate(sizes)
            for index in range(round(size * share))]


def _stratified(rest: list[Item], seed: int) -> tuple[list[Item], list[Item]]:
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(rest, test_size=VAL_FRACTION, random_state=seed, stratify=[i.label for i in rest])
    return list(train), list(val)


def _hash(rest: list[Item], seed: int) -> tuple[list[Item], list[Item]]:
    from trainables.data.holdout import carve_val

    return carve_val(rest, VAL_FRACTION, lambda i: i.label, seed)


RULES = {"stratified": _stratified, "hash": _hash}


def _split(items: list[Item], rule, seed: int) -> tuple[list[Item], list[Item], list[Item]]:
    from trainables.data.holdout import carve_test

    rest, test = carve_test(items, TEST_FRACTION, lambda i: i.label)
    train, val = rule(rest, seed)
    return train, val, test


def _balance(sizes: list[int], rule, seeds: int) -> dict:
    """Per-class validation share minus VAL_FRACTION (points), over all seeds and classes."""
    deviations, totals = [], []
    for seed in range(seeds):
        train, val, _ = _split(_items(sizes), rule, seed)
        for label in range(len(sizes)):
            in_val = sum(i.label == label for i in val)
            deviations.append(100 * (in_val / (in_val + sum(i.label == label for i in train)) - VAL_FRACTION))
        totals.append(len(val))
    deviations = np.abs(np.array(deviations))
    return {"per_class_share_abs_deviation_points": {
                "mean": round(float(deviations.mean()), 2), "p95": round(float(np.percentile(deviations, 95)), 2),
                "max": round(float(deviations.max()), 2)},
            "val_images": {"mean": round(float(np.mean(totals)), 1), "sd": round(float(np.std(totals)), 1)}}


def _stability(sizes: list[int], rule, seeds: int) -> dict:
    """Images of v2's validation and test splits that v1 trained on (mean over seeds)."""
    seen_val, seen_test, held = [], [], []
    for seed in range(seeds):
        v1_train = {i.path for i in _split(_items(sizes, 0.6), rule, seed)[0]}
        _, val, test = _split(_items(sizes), rule, seed)
        seen_val.append(sum(i.path in v1_train for i in val))
        seen_test.append(sum(i.path in v1_train for i in test))
        held.append(len(val) + len(test))
    return {"v2_val_images_v1_trained_on": round(float(np.mean(seen_val)), 1),
            "v2_test_images_v1_trained_on": round(float(np.mean(seen_test)), 1),
            "v2_val_and_test_images": round(float(np.mean(held)), 1)}


def measure(seeds: int) -> dict:
    from sklearn.datasets import load_digits

    shapes = {"digits": np.bincount(load_digits().target).tolist(),
              "imbalanced_12_classes_20_to_1": [round(240 * (1 / 20) ** (k / 11)) for k in range(12)]}
    measured = {name: {"class_sizes": sizes, **{rule: {**_balance(sizes, fn, seeds), **_stability(sizes, fn, seeds)}
                                                for rule, fn in RULES.items()}}
                for name, sizes in shapes.items()}
    for name, result in measured.items():
        leaked = result["hash"]["v2_val_images_v1_trained_on"] + result["hash"]["v2_test_images_v1_trained_on"]
        if leaked:
            raise BenchError(f"{name}: the hash holdout put {leaked} images v1 trained on in v2's held-out splits")
    return measured


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help=f"5 seeds instead of {SEEDS}")
    args = parser.parse_args(argv)
    seeds = 5 if args.smoke else SEEDS
    payload = {"val_fraction": VAL_FRACTION, "test_fraction": TEST_FRACTION, "seeds": seeds,
               "machine": machine(), **measure(seeds)}
    path = write_result("split_balance", payload, args.results)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
