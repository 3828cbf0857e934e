"""A run directory as a search leaves it, made without Ray or training: the config, a
real space (its parameters asked through Optuna and the space's own define-by-run), a
split, the driver's files, and a study whose trials report an epoch at a time (ASHA
stops, failures, and trials still running included). Every trial's best epoch has a
``metrics.json`` computed by ``trainables.training.metrics`` from simulated predictions,
which it keeps (the report's intervals read them).

Used by ``bench/report_html.py`` (200 trials) and the report page's tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import optuna

from search.config import dump_config, parse_config
from search.drivers import FINISHED, DriverRecord
from search.layout import CONFIG, SPACE, SPLIT, trial_dir
from search.space.catalog import parse_space
from search.storage import RunStore
from search.study import CHECKPOINT, REASON, TIMESTAMP, TRIAL_ID_KEY, epoch_key, open_study
from trainables.model.checkpoint import METRICS_FILE
from trainables.data.datasets import DataSplit, Sample
from trainables.data.split_files import write_split
from trainables.data.images import BadImage
from trainables.training.metrics import PREDICTIONS, compute_metrics

SPACE_FILE = Path(__file__).resolve().parents[1] / "spaces" / "tier_1k_10k.yaml"
CLASSES = tuple(f"class_{i}" for i in range(10))


def write_synthetic_run(location: Path, n_trials: int, *, epochs: int = 6, running: int = 0, seed: int = 0,
                        finished: bool = True) -> RunStore:
    """A run of ``n_trials`` at ``location``; the last ``running`` are mid-training and,
    unless ``finished``, the driver is still alive (this process)."""
    rng = np.random.default_rng(seed)
    store = RunStore.at(location)
    cfg = parse_config({
        "name": "synthetic", "output_dir": str(Path(location).parent),
        "data": {"root": str(location), "image_size": 64},
        "model": {"backbone": "resnet18", "pretrained": True},  # the space fine-tunes pretrained backbones
        "optim": {"epochs": epochs},
        "search": {"space": str(SPACE_FILE), "num_samples": n_trials},
    }, check_paths=False)
    store.write_text(CONFIG, dump_config(cfg))
    split = _split(rng)
    write_split(split, store.uri(SPLIT))
    store.write_text(SPACE, SPACE_FILE.read_text())
    space = parse_space(SPACE_FILE.read_text(), SPACE_FILE, check_depths=False)
    driver = DriverRecord(store, 1)
    handle = open_study(store, None)
    study = handle.study
    study.sampler = optuna.samplers.RandomSampler(seed=seed)
    rungs: dict[str, dict[str, float]] = {}
    labels = np.array([s.label for s in split.val])
    now = time.time()
    for n in range(n_trials):
        trial = study.ask()
        space.define_by_run(trial)
        trial_id = f"t{n:04d}"
        trial.set_user_attr(TRIAL_ID_KEY, trial_id)
        skill = rng.uniform(0.3, 0.95)  # the macro-F1 this trial tends to
        stop_at = epochs
        if n >= n_trials - running:
            stop_at = int(rng.integers(1, epochs))
        elif rng.random() < 0.4:
            stop_at = int(rng.choice([1, 2, 4]))  # ASHA's rungs
        failed = n < n_trials - running and rng.random() < 0.05
        best = (-1.0, 0)
        for epoch in range(1, (2 if failed else stop_at) + 1):
            value = float(np.clip(skill * (1 - np.exp(-epoch / 1.5)) + rng.normal(0, 0.01), 0, 1))
            if failed and epoch == 2:
                break
            trial.report(value, step=epoch)
            checkpoint = f"{trial_dir(1, trial_id)}/checkpoint_{epoch - 1:06d}"
            trial.set_user_attr(epoch_key(epoch), {
                "epoch": epoch, "macro_f1": value, "accuracy": value, "balanced_accuracy": value,
                "val_loss": float(2.3 * (1 - value)), "num_params": 11_000_000, "trainable_params": 11_000_000,
                TIMESTAMP: now + n * 30 + epoch * 5, CHECKPOINT: checkpoint,
            })
            if epoch in (1, 2, 4):
                rungs.setdefault(str(epoch), {})[trial_id] = value
            if value > best[0]:
                best = (value, epoch)
        if best[1]:
            preds = np.where(rng.random(len(labels)) < best[0], labels, rng.integers(0, len(CLASSES), len(labels)))
            metrics = compute_metrics(labels, preds[:, None], np.full(len(labels), 0.5), CLASSES)
            rel = f"{trial_dir(1, trial_id)}/checkpoint_{best[1] - 1:06d}/{METRICS_FILE}"
            store.write_json(rel, {"per_class": {k: vars(v) for k, v in metrics.per_class.items()},
                                   "confusion_matrix": metrics.confusion_matrix, PREDICTIONS: preds.tolist()})
        if failed:
            trial.set_user_attr(REASON, "RuntimeError: CUDA out of memory (simulated)")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif n >= n_trials - running:
            continue  # still training
        elif stop_at < epochs:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, best[0])
    handle.flush()
    if finished:
        driver.finish(FINISHED, asha_rungs=rungs)
    return store


def _split(rng: np.random.Generator) -> DataSplit:
    counts = [120, 110, 100, 90, 80, 70, 60, 50, 30, 12]  # imbalanced: the page should warn
    samples = {"train": [], "val": []}
    for label, count in enumerate(counts):
        for i in range(count):
            which = "val" if i % 5 == 0 else "train"
            samples[which].append(Sample(f"{CLASSES[label]}/{i:04d}.png", label, f"{label:02d}{i:038d}"))
    return DataSplit(
        root="synthetic", class_names=CLASSES, train=tuple(samples["train"]), val=tuple(samples["val"]),
        bad_files=(BadImage("class_3/broken.png", "cannot identify image file"),),
        duplicates_across_splits=(),
    )
