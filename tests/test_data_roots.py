"""Data in an object store (moto's S3 server on loopback, pyarrow's real S3 client): the
three layouts give the same split from a bucket as from the folder it was copied from,
keys stay under the root, and ImageDataset reads its images from the bucket."""

from __future__ import annotations

import re
import shutil
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from search.config import ConfigError, parse_config
from tests.conftest import small_run_config
from trainables.data.datasets import ImageDataset, list_data, prepare_split
from trainables.data.layouts import DataError
from trainables.data.roots import DataRoot, key_inside


def _upload(local, uri: str) -> str:
    fs, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def prefix(s3_bucket) -> str:
    return f"{s3_bucket}/{uuid.uuid4().hex[:8]}"


def _same_split(local, uri, **kwargs):
    here, there = prepare_split(local, **kwargs), prepare_split(uri, **kwargs)
    assert there.root == uri.rstrip("/")
    assert there.fingerprint() == here.fingerprint()  # paths, labels, hashes, classes
    assert there.bad_files == here.bad_files
    return there


def test_class_folders_in_a_bucket_split_as_they_do_on_disk(synthetic_root, tmp_path, prefix):
    local = tmp_path / "data"
    shutil.copytree(synthetic_root, local)
    (local / "class_0" / ".hidden.png").write_bytes(b"hidden files are skipped")
    (local / "class_1" / "broken.png").write_bytes(b"not an image")
    (local / "README.txt").write_text("a file in the root is not a class")
    uri = _upload(local, prefix)
    split = _same_split(local, uri + "/", seed=3)
    assert [b.path for b in split.bad_files] == ["class_1/broken.png"]
    assert len(split.train) + len(split.val) == 160


def test_train_val_folders_and_their_errors_in_a_bucket(tmp_path, prefix):
    local = tmp_path / "data"
    for split, count in (("train", 6), ("val", 3)):
        for name in ("a", "b"):
            for i in range(count):
                _png(local / split / name / f"{i}.png", hash((split, name, i)) % 10_000)
    uri = _upload(local, prefix + "/tv")
    split = _same_split(local, uri)
    assert (len(split.train), len(split.val)) == (12, 6)
    # The folder layout's rules hold for keys too.
    _upload(tmp_path / "data" / "train", prefix + "/only-train/train")
    with pytest.raises(DataError, match="'train' folder but no 'val' folder"):
        list_data(prefix + "/only-train")


def test_a_manifest_in_the_bucket_names_keys_or_uris_under_the_root(tmp_path, prefix):
    local = tmp_path / "data"
    rows = ["path,label"]
    for name in ("a", "b"):
        for i in range(5):
            _png(local / name / f"{i}.png", 100 * ord(name) + i)
            key = f"{name}/{i}.png"
            rows.append(f"{prefix}/root/{key},{name}" if i % 2 else f"{key},{name}")  # both forms
    uri = _upload(local, prefix + "/root")
    fs, base = pafs.FileSystem.from_uri(prefix)
    with fs.open_output_stream(f"{base}/manifest.csv") as out:
        out.write("\n".join(rows).encode())
    split = prepare_split(uri, manifest=f"{prefix}/manifest.csv")
    assert len(split.train) + len(split.val) == 10
    assert sorted(s.path for s in (*split.train, *split.val)) == sorted(f"{n}/{i}.png" for n in "ab" for i in range(5))


@pytest.mark.parametrize("raw, why", [
    ("a/../b.png", "'..'"),
    ("a/%2E%2E/b.png", "'..'"),  # decoded by an HTTP layer, it is '..'
    ("a//b.png", "empty"),
    ("./a.png", "'.'"),
    ("/a.png", "starts with '/'"),
    ("s3://other-bucket/data/a.png", "not under the data root"),
    ("s3://b/data-old/a.png", "not under the data root"),  # a prefix of the root, not a folder
    ("s3://b/data", "not under the data root"),
])
def test_keys_outside_the_root_are_refused(raw, why):
    with pytest.raises(DataError, match=re.escape(why)):
        key_inside(DataRoot.of("s3://b/data"), raw)


def test_keys_under_the_root_are_kept_as_given():
    root = DataRoot.of("s3://b/data/")
    assert key_inside(root, "cat/1.png") == "cat/1.png"
    assert key_inside(root, "s3://b/data/cat/a b%20c.png") == "cat/a b%20c.png"


def test_a_manifest_row_escaping_the_bucket_root_is_refused_before_any_read(tmp_path, prefix):
    _png(tmp_path / "root" / "a" / "0.png", 1)
    uri = _upload(tmp_path / "root", prefix + "/root")
    fs, base = pafs.FileSystem.from_uri(prefix)
    with fs.open_output_stream(f"{base}/m.csv") as out:
        out.write(b"path,label\na/0.png,a\n../secret/0.png,b\n")
    with pytest.raises(DataError, match=r"row 2 .*'path'.*'\.\.'"):
        list_data(uri, manifest=f"{prefix}/m.csv")


def test_image_dataset_reads_from_the_bucket(synthetic_root, prefix):
    uri = _upload(synthetic_root, prefix + "/ds")
    split = prepare_split(uri)
    here = ImageDataset(str(synthetic_root), split.val[:4], None)
    there = ImageDataset(split.root, split.val[:4], None)
    for index in range(4):
        assert np.array_equal(there[index][0], here[index][0])
        assert there[index][1] == here[index][1]


def test_config_checks_a_bucket_root_with_one_request(synthetic_root, tmp_path, prefix):
    uri = _upload(synthetic_root, prefix + "/cfg")
    cfg = parse_config(small_run_config(uri, tmp_path / "runs"))
    assert cfg.data.root == uri
    with pytest.raises(ConfigError, match=r"data.root: directory '.*/nothing-here' holds no objects"):
        parse_config(small_run_config(prefix + "/nothing-here", tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"data.manifest: file '.*/cfg' is not a file"):
        parse_config(small_run_config(uri, tmp_path / "runs", data={"manifest": uri}))
