"""Sample discovery, path safety, the per-class hash holdout, split files and ImageDataset."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from trainables.data.datasets import ImageDataset, Sample, list_data, prepare_split
from trainables.data.holdout import val_position

from trainables.data.split_files import read_split, write_split
from trainables.data.layouts import DataError, resolve_inside


def _write_png(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> Path:
    """A small PNG whose bytes differ for every seed (no accidental duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for class_index, (name, count) in enumerate(counts.items()):
        for index in range(count):
            _write_png(root / name / f"{index:03d}.png", seed + 1000 * class_index + index)
    return root


def _labels_of(split, samples) -> list[str]:
    return [split.class_names[s.label] for s in samples]


def test_holdout_is_per_class_disjoint_and_complete(tmp_path):
    counts = {"cat": 20, "dog": 10, "emu": 15}
    _class_folders(tmp_path, counts)
    split = prepare_split(tmp_path, val_fraction=0.2, seed=0)
    assert split.class_names == ("cat", "dog", "emu")
    assert split.root == str(tmp_path)
    train_paths = {s.path for s in split.train}
    val_paths = {s.path for s in split.val}
    assert not train_paths & val_paths
    assert len(train_paths | val_paths) == 45
    # The rule, image by image: val exactly when its hash position is below 0.2, except a
    # class with none below gives its lowest (never the case for all three classes at once).
    below = {path for path in train_paths | val_paths if val_position(path, 0) < 0.2}
    floors = val_paths - below
    assert below <= val_paths and len(floors) <= 1
    for floor in floors:
        cls = floor.split("/")[0]
        assert not {p for p in below if p.startswith(cls + "/")}
        assert val_position(floor, 0) == min(val_position(p, 0) for p in train_paths | val_paths
                                               if p.startswith(cls + "/"))
    val_counts = Counter(_labels_of(split, split.val))
    assert all(1 <= val_counts[name] <= count - 1 for name, count in counts.items())
    assert 4 <= len(split.val) <= 14  # binomial(45, 0.2): 9 +- 2.3 sd
    assert split.class_counts("train") == [n - val_counts[name] for name, n in counts.items()]
    assert split.class_counts("val") == [val_counts["cat"], val_counts["dog"], val_counts["emu"]]
    # Labels follow the folder each file sits in.
    assert all(s.path.split("/")[0] == split.class_names[s.label] for s in split.train + split.val)
    assert [s.path for s in split.val] == sorted(val_paths)


def test_an_image_keeps_its_side_as_its_class_grows(tmp_path):
    _class_folders(tmp_path, {"a": 30, "b": 30})
    before = prepare_split(tmp_path, seed=0, test_fraction=0.15)
    _class_folders(tmp_path, {"a": 90, "b": 60, "c": 40})  # the same 60 files and 130 new ones
    after = prepare_split(tmp_path, seed=0, test_fraction=0.15)
    for side in ("train", "val", "test"):
        assert {s.path for s in before.samples(side)} <= {s.path for s in after.samples(side)}
    # What a retrain's gate needs: nothing the old split trained on is held out now.
    assert not {s.sha1 for s in before.train} & {s.sha1 for s in after.val + after.test}
    # The listing knows the training set exactly before any image is read.
    assert list_data(tmp_path).most_train_images(0.2, 0.15, seed=0) == len(after.train)
    assert list_data(tmp_path).most_train_images(0.25, 0.1, seed=4) == len(prepare_split(
        tmp_path, val_fraction=0.25, test_fraction=0.1, seed=4).train)


def test_holdout_is_seeded(tmp_path):
    _class_folders(tmp_path, {"a": 15, "b": 15})
    first = prepare_split(tmp_path, seed=1)
    again = prepare_split(tmp_path, seed=1)
    other = prepare_split(tmp_path, seed=2)
    assert first == again
    assert first.fingerprint() == again.fingerprint()
    assert {s.path for s in first.val} != {s.path for s in other.val}
    assert first.fingerprint() != other.fingerprint()


def test_fingerprint_ignores_where_the_root_lives(tmp_path):
    _class_folders(tmp_path / "one", {"a": 5, "b": 5})
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one, two = prepare_split(tmp_path / "one"), prepare_split(tmp_path / "two")
    assert one.root != two.root
    assert one.fingerprint() == two.fingerprint()


def test_class_counts_rejects_unknown_split(tmp_path):
    split = prepare_split(_class_folders(tmp_path, {"a": 5, "b": 5}))
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'holdout'"):
        split.class_counts("holdout")


def test_train_val_folders_are_used_as_given(tmp_path):
    _class_folders(tmp_path / "train", {"a": 4, "b": 3})
    _class_folders(tmp_path / "val", {"a": 2, "b": 1}, seed=50_000)
    split = prepare_split(tmp_path)
    assert split.class_names == ("a", "b")
    assert [s.path for s in split.train] == [f"train/a/{i:03d}.png" for i in range(4)] + [
        f"train/b/{i:03d}.png" for i in range(3)
    ]
    assert [s.path for s in split.val] == ["val/a/000.png", "val/a/001.png", "val/b/000.png"]
    assert split.class_counts("val") == [2, 1]


def test_val_class_missing_from_train_is_an_error(tmp_path):
    _class_folders(tmp_path / "train", {"a": 3, "b": 3})
    _class_folders(tmp_path / "val", {"a": 1, "zebra": 1}, seed=9000)
    with pytest.raises(DataError, match=r"\['zebra'\] are in .*val but not in .*train"):
        prepare_split(tmp_path)


def test_train_folder_without_val_folder_is_an_error(tmp_path):
    _class_folders(tmp_path / "train", {"a": 3, "b": 3})
    with pytest.raises(DataError, match="has a 'train' folder but no 'val' folder"):
        prepare_split(tmp_path)


def test_walk_is_recursive_skips_hidden_and_scans_every_extension(tmp_path, caplog):
    _class_folders(tmp_path, {"a": 3, "b": 3})
    _write_png(tmp_path / "a" / "nested" / "deep" / "x.jpg.png", 77)
    _write_png(tmp_path / "a" / ".hidden.png", 78)
    _write_png(tmp_path / "a" / ".cache" / "y.png", 79)
    _write_png(tmp_path / ".thumbnails" / "z.png", 80)  # a hidden "class"
    (tmp_path / "b" / "README.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="trainables.data.datasets"):
        split = prepare_split(tmp_path)
    paths = {s.path for s in split.train + split.val}
    assert "a/nested/deep/x.jpg.png" in paths
    assert len(paths) == 7
    assert split.class_names == ("a", "b")
    assert [(b.path, b.reason) for b in split.bad_files] == [
        ("b/README.txt", "not an image (PIL cannot identify it)")
    ]
    assert "b/README.txt" in caplog.text


def test_strict_lists_every_bad_file(tmp_path):
    _class_folders(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    good = (tmp_path / "b" / "000.png").read_bytes()
    (tmp_path / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    lenient = prepare_split(tmp_path)
    assert {b.path for b in lenient.bad_files} == {"a/empty.png", "b/cut.png"}
    assert len(lenient.train) + len(lenient.val) == 8
    with pytest.raises(DataError) as info:
        prepare_split(tmp_path, strict=True)
    message = str(info.value)
    assert "2 bad file(s)" in message
    assert "a/empty.png: empty file (0 bytes)" in message
    assert "b/cut.png: truncated or corrupt" in message


def test_oversized_images_are_skipped_with_max_pixels(tmp_path):
    _class_folders(tmp_path, {"a": 4, "b": 4})
    _write_png(tmp_path / "a" / "huge.png", 5, size=(20, 20))
    split = prepare_split(tmp_path, max_pixels=100)
    assert [b.path for b in split.bad_files] == ["a/huge.png"]
    assert split.bad_files[0].reason.startswith("oversized: 20x20 = 400 pixels")


@pytest.mark.parametrize("val_fraction", [0.1, 0.14, 0.31, 0.5, True])
def test_val_fraction_outside_15_to_30_percent(tmp_path, val_fraction):
    _class_folders(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(DataError, match=r"val_fraction must be between 0.15 and 0.3"):
        prepare_split(tmp_path, val_fraction=val_fraction)


def test_class_without_valid_image_is_named(tmp_path):
    _class_folders(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "ghost").mkdir()
    (tmp_path / "ghost" / "broken.png").write_text("nope")
    with pytest.raises(DataError, match=r"classes \['ghost'\] have no valid training image"):
        prepare_split(tmp_path)


def test_fewer_than_two_classes(tmp_path):
    _class_folders(tmp_path, {"only": 6})
    with pytest.raises(DataError, match=r"found 1 class\(es\) \['only'\].*at least 2"):
        prepare_split(tmp_path)


def test_single_image_class_cannot_be_stratified(tmp_path):
    _class_folders(tmp_path, {"a": 6, "lonely": 1})
    with pytest.raises(DataError, match=r"\['lonely'\] have a single valid image.*at least 2 per class"):
        prepare_split(tmp_path)


def test_a_class_of_two_gives_one_image_to_each_side(tmp_path):
    # 6 images * 0.2 is fewer than the 3 classes: each class still gives one of its two.
    _class_folders(tmp_path, {"a": 2, "b": 2, "c": 2})
    split = prepare_split(tmp_path)
    assert split.class_counts("train") == split.class_counts("val") == [1, 1, 1]


def test_duplicates_across_splits_warn_and_are_recorded(tmp_path):
    _class_folders(tmp_path / "train", {"a": 3, "b": 3})
    _class_folders(tmp_path / "val", {"a": 2, "b": 2}, seed=70_000)
    shutil.copy(tmp_path / "train" / "b" / "001.png", tmp_path / "val" / "b" / "copy.png")
    pattern = r"1 held-out image\(s\) have byte-identical copies in an earlier split.*train/b/001.png"
    with pytest.warns(UserWarning, match=pattern):
        split = prepare_split(tmp_path)
    assert split.duplicates_across_splits == (("train/b/001.png", "val/b/copy.png"),)


def test_no_duplicate_warning_for_distinct_files(tmp_path):
    _class_folders(tmp_path, {"a": 5, "b": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = prepare_split(tmp_path)
    assert split.duplicates_across_splits == ()


def test_resolve_inside_allows_inner_paths_and_rejects_escapes(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    assert resolve_inside(root, "a/../b.png") == root / "b.png"
    assert resolve_inside(root, str(root / "x.png")) == root / "x.png"
    with pytest.raises(DataError, match=r"'\.\./secret\.png' resolves to .*outside the data root"):
        resolve_inside(root, "../secret.png")
    with pytest.raises(DataError, match="outside the data root"):
        resolve_inside(root, "/etc/passwd")
    with pytest.raises(DataError, match="outside the data root"):
        resolve_inside(root, "a/../../data-evil/x.png")  # shares a prefix but is a sibling


def test_symlink_in_class_folder_pointing_outside_is_an_error(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 4, "b": 4})
    outside = _write_png(tmp_path / "outside.png", 999)
    os.symlink(outside, root / "a" / "sneaky.png")
    with pytest.raises(DataError, match=r"sneaky\.png' resolves to .*outside\.png', outside the data root"):
        prepare_split(root)


def test_symlinked_folder_pointing_outside_is_an_error(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 4, "b": 4})
    _class_folders(tmp_path / "elsewhere", {"c": 2}, seed=400)
    os.symlink(tmp_path / "elsewhere" / "c", root / "a" / "more")
    with pytest.raises(DataError, match="outside the data root"):
        prepare_split(root)


def test_symlinks_inside_the_root_are_followed(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 4, "b": 4})
    _write_png(root / "store" / "extra.png", 123)
    (root / "store").rename(root / ".store")  # hidden, so not a class itself
    os.symlink(root / ".store" / "extra.png", root / "b" / "linked.png")
    split = prepare_split(root)
    assert "b/linked.png" in {s.path for s in split.train + split.val}


@pytest.mark.parametrize(("link", "target", "where"), [
    ("a/loop", "..", "the data root itself"),  # would label b's images 'a'
    ("a/loop", ".", "'a' in the data root"),
    ("a/deep/loop", "..", "'a' in the data root"),
    ("all", ".", "the data root itself"),  # a class folder holding every class
    ("a/loop", "../..", "'{outside}', above the data root"),  # outside too: the loop is the clearer message
])
def test_symlinked_folder_looping_back_into_its_own_ancestry_is_an_error(tmp_path, link, target, where):
    root = _class_folders(tmp_path / "data", {"a": 4, "b": 4})
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, root / link)
    with pytest.raises(DataError) as caught:
        prepare_split(root)
    message = str(caught.value)
    where = where.format(outside=os.path.realpath(tmp_path))
    assert message.startswith(f"symlink '{link}' -> '{target}' points back to {where}, which contains the link")
    assert "Remove the link, or point it at a folder inside the root that does not contain it." in message
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:.*byte-identical copies:UserWarning")  # today's duplicate report
def test_symlinked_folder_to_a_sibling_is_followed(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 4, "b": 4, "c": 4})
    _class_folders(root / "c" / "sub", {"d": 2}, seed=500)
    os.symlink("../c/sub", root / "a" / "more")
    os.symlink("../../a", root / "c" / "sub" / "back")  # a folder the walk of 'c' is not inside
    split = prepare_split(root)
    labels = {s.path: split.class_names[s.label] for s in split.train + split.val}
    assert labels["a/more/d/000.png"] == "a" and labels["c/sub/d/000.png"] == "c"
    assert labels["c/sub/back/000.png"] == "c"
    assert "a/more/back/000.png" not in labels  # 'a' is walked once


def _manifest_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for index in range(12):
        _write_png(root / "img" / f"{index:02d}.png", index)
    return root


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_manifest_with_split_column(tmp_path):
    root = _manifest_root(tmp_path)
    rows = [f"img/{i:02d}.png,{'cat' if i % 2 else 'dog'},{'val' if i >= 8 else 'train'}" for i in range(12)]
    manifest = _write_csv(tmp_path / "m.csv", ["path,label,split", *rows])
    split = prepare_split(root, manifest=manifest)
    assert split.class_names == ("cat", "dog")
    assert [s.path for s in split.val] == [f"img/{i:02d}.png" for i in range(8, 12)]
    assert len(split.train) == 8
    assert _labels_of(split, split.val) == ["dog", "cat", "dog", "cat"]


def test_csv_manifest_without_split_uses_the_hash_holdout(tmp_path):
    root = _manifest_root(tmp_path)
    # Labels stay text: "01" and "1" are two different classes.
    rows = [f"{root / 'img' / f'{i:02d}.png'},{'01' if i < 6 else '1'}" for i in range(12)]
    manifest = _write_csv(tmp_path / "m.csv", ["path,label", *rows])
    split = prepare_split(root, manifest=manifest, val_fraction=0.3, seed=3)
    assert split.class_names == ("01", "1")
    # Held out by the same rule as folders: a hash of each stored (relative) path.
    below = [sum(val_position(f"img/{i:02d}.png", 3) < 0.3 for i in range(start, start + 6)) for start in (0, 6)]
    assert split.class_counts("val") == [min(max(n, 1), 5) for n in below]
    assert all(s.path.startswith("img/") for s in split.train)  # absolute rows stored relative


def test_parquet_manifest_with_and_without_split(tmp_path):
    root = _manifest_root(tmp_path)
    paths = [f"img/{i:02d}.png" for i in range(12)]
    labels = [i % 3 for i in range(12)]  # integer labels become class names "0", "1", "2"
    with_split = tmp_path / "with.parquet"
    splits = ["val"] * 3 + ["train"] * 9
    pq.write_table(pa.table({"path": paths, "label": labels, "split": splits}), with_split)
    split = prepare_split(root, manifest=with_split)
    assert split.class_names == ("0", "1", "2")
    assert [s.path for s in split.val] == paths[:3]
    assert [s.label for s in split.val] == [0, 1, 2]
    without = tmp_path / "without.parquet"
    pq.write_table(pa.table({"path": paths, "label": labels}), without)
    holdout = prepare_split(root, manifest=without, val_fraction=0.25)
    assert all(1 <= n <= 3 for n in holdout.class_counts("val")) and len(holdout.train + holdout.val) == 12


def test_manifest_missing_columns(tmp_path):
    root = _manifest_root(tmp_path)
    manifest = _write_csv(tmp_path / "m.csv", ["file,class", "img/00.png,a"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['path', 'label'\]; found \['file', 'cl"):
        prepare_split(root, manifest=manifest)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ("img/02.png,,train", r"row 3 \(after the header\), column 'label': empty"),
        (",b,train", r"row 3 \(after the header\), column 'path': empty"),
        ("img/02.png,b,valid", r"row 3 \(after the header\), column 'split': got 'valid', expected 'train'"),
        ("img/00.png,b,val", r"row 3 \(after the header\), column 'path': 'img/00.png' repeats row 1"),
    ],
)
def test_manifest_row_errors_name_row_and_column(tmp_path, row, pattern):
    root = _manifest_root(tmp_path)
    header_and_rows = ["path,label,split", "img/00.png,a,train", "img/01.png,b,val", row]
    manifest = _write_csv(tmp_path / "m.csv", header_and_rows)
    with pytest.raises(DataError, match=pattern):
        prepare_split(root, manifest=manifest)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_manifest_paths_escaping_the_root(tmp_path, kind):
    root = _manifest_root(tmp_path)
    outside = _write_png(tmp_path / "outside.png", 500)
    os.symlink(outside, root / "img" / "link.png")
    escaping = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "img/link.png"}[kind]
    lines = ["path,label", "img/00.png,a", "img/01.png,b", f"{escaping},a"]
    manifest = _write_csv(tmp_path / "m.csv", lines)
    with pytest.raises(DataError, match=r"row 3 .*column 'path': .*resolves to .*outside\.png', outside"):
        prepare_split(root, manifest=manifest)


def test_manifest_with_unsupported_suffix(tmp_path):
    root = _manifest_root(tmp_path)
    with pytest.raises(DataError, match=r"manifest must be a \.csv or \.parquet file"):
        prepare_split(root, manifest=tmp_path / "m.xlsx")


def test_split_file_round_trip(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 6, "b": 5})
    (root / "a" / "bad.png").write_bytes(b"")
    split = prepare_split(root, seed=4)
    target = tmp_path / "run" / "split.parquet"
    write_split(split, target)
    assert (tmp_path / "run" / "split.json").is_file()
    table = pq.read_table(target)
    assert table.column_names == ["split", "path", "label", "class_name", "sha1"]
    assert table.column("class_name").to_pylist()[0] == split.class_names[split.train[0].label]
    loaded = read_split(target)
    assert loaded == split
    assert loaded.bad_files[0].path == "a/bad.png"
    assert loaded.fingerprint() == split.fingerprint()


def test_edited_split_file_is_rejected(tmp_path):
    root = _class_folders(tmp_path / "data", {"a": 5, "b": 5})
    target = tmp_path / "split.parquet"
    write_split(prepare_split(root), target)
    table = pq.read_table(target)
    labels = table.column("label").to_pylist()
    labels[0] = 1 - labels[0]
    pq.write_table(table.set_column(2, "label", pa.array(labels, pa.int64())), target)
    with pytest.raises(DataError, match="does not match its fingerprint"):
        read_split(target)
    with pytest.raises(DataError, match="must be a .parquet path"):
        write_split(prepare_split(root), tmp_path / "split.json")


def test_image_dataset_applies_albumentations_and_returns_tensors(tmp_path):
    root = _class_folders(tmp_path, {"a": 4, "b": 4})
    split = prepare_split(root)
    transform = A.Compose([A.Resize(16, 12), A.Normalize(), ToTensorV2()])
    dataset = ImageDataset(split.root, split.train, transform)
    assert len(dataset) == len(split.train)
    assert dataset.labels == [s.label for s in split.train]
    image, label = dataset[0]
    assert isinstance(image, torch.Tensor)
    assert image.shape == (3, 16, 12) and image.dtype == torch.float32
    assert label == split.train[0].label
    batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch.shape == (3, 3, 16, 12)
    assert labels.tolist() == dataset.labels[:3]


def test_image_dataset_without_transform_returns_raw_rgb(tmp_path):
    _write_png(tmp_path / "x.png", 1, size=(5, 7))
    dataset = ImageDataset(str(tmp_path), [Sample("x.png", 3, "unused")], transform=None)
    image, label = dataset[0]
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert label == 3


def test_image_dataset_needs_a_tensor_producing_transform(tmp_path):
    _write_png(tmp_path / "x.png", 1)
    dataset = ImageDataset(str(tmp_path), [Sample("x.png", 0, "unused")], A.Compose([A.Resize(4, 4)]))
    with pytest.raises(TypeError, match=r"end the Compose with albumentations\.pytorch\.ToTensorV2"):
        dataset[0]
    with pytest.raises(TypeError, match="transform must be an albumentations Compose or None"):
        ImageDataset(str(tmp_path), [], transform="resize")
