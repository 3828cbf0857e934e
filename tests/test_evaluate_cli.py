"""``tunecv evaluate`` refuses a folder that is not a checkpoint, or a split that is not
there, in one line and before Ray starts. No test here starts Ray: the command runs with
an unreachable ``RAY_ADDRESS`` (conftest's ``tunecv_here``), so a check that let a bad
input through would fail to join a cluster rather than start one."""

import json
from pathlib import Path

import pytest

from search.config import ConfigError
from search.jobs.evaluate import check_evaluation_inputs
from trainables.model.checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE
from trainables.data.datasets import prepare_split
from trainables.data.split_files import write_split


@pytest.fixture(scope="module")
def split_file(tmp_path_factory, synthetic_root) -> Path:
    path = tmp_path_factory.mktemp("run") / "split.parquet"
    write_split(prepare_split(synthetic_root), str(path))
    return path


def _checkpoint(directory: Path, class_names: list[str], format_version: int = FORMAT_VERSION) -> Path:
    """A folder with a checkpoint's two files; the check reads meta.json, not the weights."""
    directory.mkdir(parents=True)
    (directory / META_FILE).write_text(json.dumps({"format_version": format_version, "class_names": class_names}))
    (directory / WEIGHTS_FILE).write_bytes(b"")
    return directory


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", ["trial folder", "missing split"])
def test_evaluate_refuses_bad_inputs_in_one_line_before_ray(tmp_path, split_file, case, tunecv_here):
    classes = list(json.loads(split_file.with_suffix(".json").read_text())["class_names"])
    if case == "trial folder":  # the folder above the checkpoints, as a user may pass it
        target = tmp_path / "t0003"
        for name in ("checkpoint_000000", "checkpoint_000001"):
            _checkpoint(target / name, classes)
        split, expected = split_file, [f"checkpoint '{target}'", "no meta.json and no model.safetensors",
                                       f"'{target}/checkpoint_000001'"]
    else:
        target = _checkpoint(tmp_path / "checkpoint_000002", classes)
        split = tmp_path / "split.parquet"
        expected = [f"split file '{split}' does not exist", "RUN/split.parquet"]
    before = _listing(tmp_path)
    done = tunecv_here("evaluate", target, "--split", split)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunecv: error: "), done.stderr
    for text in expected:
        assert text in lines[0]
    assert "ray" not in done.stderr.lower()
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", "checkpoint '{}' does not exist; pass a checkpoint directory such as RUN/tune/"),
    (lambda p: (p / "model.safetensors").write_bytes(b"") or p / "model.safetensors",
     "checkpoint '{}' is a file, not a directory"),
    (lambda p: _checkpoint(p / "c", ["a"]) and p / "c" / META_FILE, "is a file, not a directory"),
    (lambda p: (p / "empty").mkdir() or f"file://{p / 'empty'}",
     "checkpoint '{}' is not a tunecv checkpoint: it has no meta.json and no model.safetensors; pass a"),
    (lambda p: "nosuch://bucket/ckpt", "cannot open checkpoint '{}': "),
    (lambda p: _checkpoint(p / "c", ["a"], format_version=0), "has format_version 0, this tunecv reads"),
], ids=["missing", "weights file", "meta file", "empty folder by URI", "unknown scheme", "other format"])
def test_a_folder_without_a_checkpoint_is_named_with_the_fix(tmp_path, split_file, make, message):
    checkpoint = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_evaluation_inputs(checkpoint, split_file)
    assert message.format(checkpoint) in str(info.value)


def test_a_split_of_other_classes_is_refused(tmp_path, split_file):
    checkpoint = _checkpoint(tmp_path / "c", ["cat", "dog"])
    with pytest.raises(ConfigError, match=r"classifies 2 classes \(cat, dog\), the split .* has 4 ") as info:
        check_evaluation_inputs(checkpoint, split_file)
    assert "pass the split of the checkpoint's own run" in str(info.value)


def test_a_checkpoint_and_its_split_pass(tmp_path, split_file):
    classes = json.loads(split_file.with_suffix(".json").read_text())["class_names"]
    check_evaluation_inputs(_checkpoint(tmp_path / "c", classes), split_file)
