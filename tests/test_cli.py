"""The tunecv command line, run as a user runs it."""

import subprocess
import sys

import yaml

from tests.conftest import small_run_config


def _tunecv(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_train_prints_epochs_and_per_class_report(synthetic_root, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(synthetic_root, tmp_path / "runs")))
    proc = _tunecv("train", "--config", str(path), "--set", "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "epoch   1" in proc.stdout
    for k in range(4):
        assert f"class_{k}" in proc.stdout
    assert "macro-F1" in proc.stdout
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    for name in ("config.yaml", "split.parquet", "split.json", "metrics.jsonl", "best", "last"):
        assert (run_dirs[0] / name).exists(), name


def test_bad_config_fails_fast_with_exit_2_and_no_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    raw = small_run_config(tmp_path, tmp_path / "runs", optim={"epochz": 3})
    path.write_text(yaml.safe_dump(raw))
    proc = _tunecv("train", "--config", str(path))
    assert proc.returncode == 2
    assert "optim.epochz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing created before validation passed


def test_corrupt_images_are_listed_and_skipped(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "class_1" / "empty.png").write_bytes(b"")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(root, tmp_path / "runs")))
    proc = _tunecv("train", "--config", str(path), "--set", "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 bad file(s)" in proc.stdout
    assert "class_0/broken.png" in proc.stdout and "class_1/empty.png" in proc.stdout
    strict = _tunecv("train", "--config", str(path), "--set", "data.strict=true")
    assert strict.returncode == 2
    assert "broken.png" in strict.stderr and "empty.png" in strict.stderr


def test_data_digits_writes_the_bundled_set(tmp_path):
    proc = _tunecv("data", "digits", str(tmp_path / "digits"), "--image-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "1797 digit images in 10 classes" in proc.stdout
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797


def test_data_commands_never_overwrite_or_traceback_on_bad_arguments(tmp_path):
    out = tmp_path / "synth"
    assert _tunecv("data", "synthetic", str(out), "--image-size", "16").returncode == 0
    first = (out / "class_0" / "0000.png").read_bytes()
    again = _tunecv("data", "synthetic", str(out), "--image-size", "16", "--seed", "1")
    assert again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr
    assert (out / "class_0" / "0000.png").read_bytes() == first  # nothing of the user's replaced
    forced = _tunecv("data", "synthetic", str(out), "--image-size", "16", "--seed", "1", "--overwrite")
    assert forced.returncode == 0 and (out / "class_0" / "0000.png").read_bytes() != first
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in (
        (["synthetic", str(tmp_path / "n"), "--num-classes", "0"], "num_classes must be an integer of at least 2"),
        (["synthetic", str(tmp_path / "s"), "--image-size", "-5"], "image_size must be an integer of at least 8"),
        (["digits", str(a_file)], "is a file"),
    ):
        proc = _tunecv("data", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_run_with_bad_data_fails_before_ray_and_leaves_no_run_directory(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(empty, tmp_path / "runs")))
    proc = _tunecv("run", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "have no valid training image;" in proc.stderr  # none skipped
    assert "Ray" not in proc.stdout + proc.stderr  # no "Started a local Ray instance"
    assert not (tmp_path / "runs").exists()
