"""The held-out test split: carved by path hash, stratified, disjoint, stable as data grows,
or given as root/test/<class> or a manifest's split=test rows; and the bootstrap intervals."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from search.results.intervals import macro_f1_interval, paired_difference
from tests.test_datasets import _class_folders, _manifest_root, _write_csv, _write_png
from trainables.data.datasets import Sample, list_data, prepare_split
from trainables.data.holdout import carve_test, check_test_fraction
from trainables.data.split_files import read_split, write_split
from trainables.data.layouts import DataError


def test_test_split_is_disjoint_stratified_and_kept_out_of_the_search(tmp_path):
    counts = {"cat": 60, "dog": 30, "emu": 3, "fox": 2}
    _class_folders(tmp_path, counts)
    split = prepare_split(tmp_path, val_fraction=0.2, test_fraction=0.15)
    paths = [{s.path for s in split.samples(name)} for name in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert sum(map(len, paths)) == 95
    test_counts = Counter(split.class_names[s.label] for s in split.test)
    # A hash share, not an exact one: within a few images of 15 % for the large classes.
    assert abs(test_counts["cat"] - 9) <= 5 and abs(test_counts["dog"] - 4.5) <= 4
    assert test_counts["emu"] == 1 and test_counts["fox"] == 0  # 3 images: one each; 2: none
    assert split.class_counts("train")[2] == 1 and split.class_counts("val")[2] == 1
    # The validation holdout is drawn from what the test split left, by its own hash.
    assert abs(len(split.val) - 0.2 * (95 - len(split.test))) <= 8  # binomial: sd 3.6


def test_a_file_never_changes_side_as_the_data_grows_or_the_seed_changes(tmp_path):
    samples = [Sample(f"c{label}/{i:04d}.png", label, "") for label in range(3) for i in range(200)]
    _, test = carve_test(samples, 0.15, lambda s: s.label)
    grown = samples + [Sample(f"c{label}/new{i:04d}.png", label, "") for label in range(3) for i in range(300)]
    _, grown_test = carve_test(grown, 0.15, lambda s: s.label)
    assert {s.path for s in test} <= {s.path for s in grown_test}
    assert 0.10 < len(grown_test) / len(grown) < 0.20
    one = prepare_split(_class_folders(tmp_path, {"a": 40, "b": 40}), test_fraction=0.15, seed=0)
    two = prepare_split(tmp_path, test_fraction=0.15, seed=7)
    assert one.test == two.test and one.val != two.val


def test_zero_test_fraction_keeps_the_split_and_fingerprint_of_before(tmp_path):
    _class_folders(tmp_path, {"a": 20, "b": 20})
    without = prepare_split(tmp_path, test_fraction=0.0)
    assert without.test == ()
    assert without.fingerprint() == prepare_split(tmp_path).fingerprint()
    with pytest.raises(DataError, match="test_fraction must be between 0 and 0.3, got 0.5"):
        check_test_fraction(0.5)


def test_test_folder_is_used_as_given_and_checked(tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for name in ("a", "b"):
            for i in range(count):
                _write_png(tmp_path / split / name / f"{i}.png", hash((split, name, i)) % 10**6)
    split = prepare_split(tmp_path, test_fraction=0.15)
    assert Counter(s.path.split("/")[0] for s in split.test) == {"test": 6}
    assert len(split.train) == 12  # nothing carved from train when the data gives a test split
    _write_png(tmp_path / "test" / "zebra" / "0.png", 99)
    with pytest.raises(DataError, match=r"classes \['zebra'\] are in .*/test but not in"):
        prepare_split(tmp_path)


def test_manifest_split_test_rows_and_a_roundtrip_through_the_split_file(tmp_path):
    root = _manifest_root(tmp_path)
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    rows = [f"img/{i:02d}.png,{'cat' if i % 2 else 'dog'},{s}" for i, s in enumerate(splits)]
    split = prepare_split(root, manifest=_write_csv(tmp_path / "m.csv", ["path,label,split", *rows]))
    assert [s.path for s in split.test] == ["img/09.png", "img/10.png", "img/11.png"]
    write_split(split, tmp_path / "out" / "split.parquet")
    again = read_split(tmp_path / "out" / "split.parquet")
    assert again == split and again.fingerprint() == split.fingerprint()
    assert list_data(root, tmp_path / "m.csv").most_train_images(0.2, 0.15) == 6


def test_a_test_image_identical_to_a_training_image_is_warned_about(tmp_path):
    _class_folders(tmp_path, {"a": 30, "b": 30})
    split = prepare_split(tmp_path, test_fraction=0.15)
    copy = Path(tmp_path) / split.train[0].path
    target = Path(tmp_path) / split.test[0].path
    target.write_bytes(copy.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = prepare_split(tmp_path, test_fraction=0.15)
    assert (split.train[0].path, split.test[0].path) in again.duplicates_across_splits
    assert any("held-out image(s) have byte-identical copies" in str(w.message) for w in caught)


def test_interval_holds_the_sklearn_macro_f1_and_paired_ties_are_found():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 400)
    good = np.where(rng.random(400) < 0.85, labels, rng.integers(0, 6, 400))
    interval = macro_f1_interval(labels, good, 6)
    assert interval.value == pytest.approx(f1_score(labels, good, average="macro"), abs=1e-12)
    assert interval.low < interval.value < interval.high and interval.high - interval.low < 0.15
    assert macro_f1_interval(labels, good, 6) == interval  # seeded: a re-read report agrees
    one_flip = good.copy()
    one_flip[np.flatnonzero(good == labels)[0]] = (labels[np.flatnonzero(good == labels)[0]] + 1) % 6
    tie = paired_difference(labels, good, one_flip, 6)
    assert tie.value > 0 and tie.low <= 0  # one image apart: the split cannot tell them apart
    worse = np.where(rng.random(400) < 0.5, labels, rng.integers(0, 6, 400))
    assert paired_difference(labels, good, worse, 6).low > 0
    with pytest.raises(ValueError, match="expected one prediction per image"):
        macro_f1_interval(labels, good[:10], 6)

    # The report scores every trial on one draw of resamples: the same intervals and
    # paired differences as one model or one pair at a time.
    from search.results.intervals import interval_of, resampled_macro_f1

    scored = resampled_macro_f1(labels, {"good": good, "one_flip": one_flip, "worse": worse}, 6)
    assert interval_of(*scored["good"]) == interval
    (a, a_samples), (b, b_samples) = scored["good"], scored["one_flip"]
    assert interval_of(a - b, a_samples - b_samples) == tie
