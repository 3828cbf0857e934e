"""The training loop end to end, in-process (2 DDP ranks under Ray Train: test_multinode.py)."""

import json

import numpy as np
import pytest
import torch

from search.config import parse_config
from search.jobs.train import train
from search.scan_cache import CACHE_DIR
from tests.conftest import small_run_config
from trainables.model.checkpoint import load_model, read_meta
from trainables.data.split_files import read_split
from trainables.data.loaders import create_val_loader
from trainables.training.loop import evaluate
from trainables.training.reporting import LocalRunReporter
from trainables.runtime.ranks import Runtime, local_runtime
from trainables.data.transforms import create_eval_transform


def _train(synthetic_root, tmp_path, **sections):
    cfg = parse_config(small_run_config(synthetic_root, tmp_path / "runs", **sections))
    lines = []
    run_dir = train(cfg, print_fn=lines.append)
    return cfg, run_dir, lines


def test_two_epochs_beat_chance_by_a_clear_margin(synthetic_root, tmp_path):
    cfg, run_dir, lines = _train(synthetic_root, tmp_path)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    best = max(r["macro_f1"] for r in records)
    assert best > 0.45  # chance macro-F1 with 4 balanced classes is ~0.25
    assert set(records[-1]["per_class"]) == {f"class_{k}" for k in range(4)}
    cm = np.array(records[-1]["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == len(read_split(run_dir / "split.parquet").val)
    assert any("macro-F1" in l for l in lines)


def test_same_seed_same_result(synthetic_root, tmp_path):
    # Augmentation included: albumentations keeps its own RNG, seeded from optim.seed.
    results = []
    for attempt in ("a", "b"):
        _, run_dir, _ = _train(synthetic_root, tmp_path / attempt, optim={"epochs": 1})
        results.append(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0]))
    assert results[0]["train_loss"] == results[1]["train_loss"]
    assert results[0]["macro_f1"] == results[1]["macro_f1"]


def _evaluate_checkpoint(run_dir, batch_size):
    """Reload ``run_dir/best`` and evaluate it in this process, as a user would."""
    meta = read_meta(run_dir / "best")
    model, _ = load_model(run_dir / "best")
    split = read_split(run_dir / "split.parquet")
    pre = meta["preprocessing"]
    tf = create_eval_transform(pre["image_size"], pre["resize_mode"], pre["mean"], pre["std"], pre["crop_pct"])
    runtime = local_runtime(use_gpu=False)
    loader, _ = create_val_loader(split, tf, batch_size=batch_size, num_workers=0, runtime=runtime, max_pixels=10**8)
    return evaluate(model, loader, runtime, list(split.class_names)), meta, split


def test_checkpoint_reloads_to_the_reported_metrics(synthetic_root, tmp_path):
    cfg, run_dir, _ = _train(synthetic_root, tmp_path, optim={"epochs": 1})
    metrics, meta, split = _evaluate_checkpoint(run_dir, batch_size=7)
    assert metrics.macro_f1 == pytest.approx(meta["metrics"]["macro_f1"], abs=1e-9)
    assert meta["data_fingerprint"] == split.fingerprint()
    assert meta["class_names"] == list(split.class_names)


def test_frozen_backbone_weights_do_not_move(synthetic_root, tmp_path):
    """Head-only fine-tuning of weights tunecv wrote itself (frozen random weights are refused)."""
    import timm
    from safetensors.torch import save_model

    initial = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    save_model(initial, str(tmp_path / "test_resnet.safetensors"))
    model = {"pretrained": True, "weights_file": str(tmp_path / "test_resnet.safetensors"), "unfreeze_depth": 0}
    cfg, run_dir, _ = _train(synthetic_root, tmp_path, optim={"epochs": 1, "seed": 5}, model=model)
    trained, _ = load_model(run_dir / "last")
    assert torch.equal(initial.layer1[0].conv1.weight, trained.layer1[0].conv1.weight)
    assert torch.equal(initial.bn1.running_mean, trained.bn1.running_mean)  # frozen BN in eval
    assert not torch.equal(initial.fc.weight, trained.fc.weight)


@pytest.mark.parametrize(
    "loss", [{"type": "weighted_ce"}, {"type": "focal", "gamma": 2.0, "alpha": "balanced"}]
)
def test_imbalance_options_train(loss, tmp_path):
    from trainables.data.demo_data import write_synthetic

    root = tmp_path / "imbalanced"
    write_synthetic(root, num_classes=3, images_per_class=[60, 20, 10], image_size=32, seed=1)
    _, run_dir, _ = _train(
        root, tmp_path, loss=loss, optim={"epochs": 1, "balanced_sampler": True, "grad_accum_steps": 2}
    )
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and 0.0 <= record["macro_f1"] <= 1.0


def test_batch_larger_than_training_set_is_refused_before_training(synthetic_root, tmp_path):
    from search.config import ConfigError

    cfg = parse_config(small_run_config(synthetic_root, tmp_path / "runs", optim={"batch_size": 1000}))
    with pytest.raises(ConfigError, match="set optim.batch_size to at most 130"):
        train(cfg, print_fn=lambda *_: None)
    runs = tmp_path / "runs"  # refused before the run directory (the scan cache is kept)
    assert [p.name for p in runs.iterdir()] == [CACHE_DIR]


def test_val_shards_cover_every_image_once():
    from trainables.data.loaders import val_shard

    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            rt = [Runtime(rank=r, world_size=world, device=torch.device("cpu")) for r in range(world)]
            covered = [i for r in rt for i in val_shard(n, r)]
            assert covered == list(range(n))


class _CrashAfter(LocalRunReporter):
    """Keeps epochs and checkpoints, then raises: a trial dying mid-run."""

    def __init__(self, directory, crash_after_epoch):
        super().__init__(directory)
        self.crash_after_epoch = crash_after_epoch

    def report(self, result, checkpoint_dir):
        super().report(result, checkpoint_dir)
        if result.epoch == self.crash_after_epoch:
            raise RuntimeError("simulated crash")


def test_resuming_from_last_checkpoint_continues_exactly(synthetic_root, tmp_path):
    """Restoring weights, AdamW state, the LR schedule and the epoch from last/ gives
    the run that never stopped: same losses, LRs, macro-F1 and final weights."""
    from safetensors.torch import load_file

    from trainables.data.datasets import prepare_split
    from trainables.training.loop import run_trial

    # Deterministic augmentation: albumentations' stream restarts with the process, so
    # only the loop's own state is under test here.
    cfg = parse_config(small_run_config(
        synthetic_root, tmp_path, optim={"epochs": 3, "warmup_epochs": 1.0},
        augment={"strength": 0.0, "hflip": False, "color_jitter": 0.0, "coarse_dropout_p": 0.0},
    )).trial()
    split = prepare_split(synthetic_root, val_fraction=0.2, seed=0)
    runtime = local_runtime(use_gpu=False)
    run_trial(cfg, split, LocalRunReporter(tmp_path / "straight"), runtime)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_trial(cfg, split, _CrashAfter(tmp_path / "resumed", crash_after_epoch=1), runtime)
    run_trial(cfg, split, LocalRunReporter(tmp_path / "resumed"), runtime, resume_from=tmp_path / "resumed" / "last")

    def lines(name):
        return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = lines("straight"), lines("resumed")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "lr_head", "lr_base", "macro_f1", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["epoch"], key)
    weights_a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a)
    assert not (tmp_path / "resumed" / "best" / "train_state").exists()  # export needs weights only
