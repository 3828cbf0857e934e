"""Mirror: a run directory in an object store (moto's S3 server, pyarrow's S3 client).

A checkpoint push killed half way leaves the store in one of two states: the
replacement still uploading (``last.staged`` without its ``.complete`` marker), or
complete and being copied over ``last``. Whatever level a process pulls from (the
whole run, as a resuming driver does, or the checkpoint, as the trial does), it must
get one whole checkpoint, and the same one.
"""

import json
import uuid

import pyarrow.fs as pafs

from trainables.mirror import Mirror

CKPT = "trials/t0000/last"


def _mirror(bucket: str, tmp_path, name: str) -> Mirror:
    return Mirror(f"{bucket}/{name}", tmp_path / f"local-{uuid.uuid4().hex[:6]}")


def _write_checkpoint(directory, epoch: int) -> None:
    (directory / "train_state").mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").write_text(json.dumps({"epoch": epoch}))
    (directory / "model.safetensors").write_bytes(bytes([epoch]) * 64)
    (directory / "train_state" / "state.json").write_text(json.dumps({"epoch": epoch}))


def _checkpoint_at(local, rel: str = CKPT) -> tuple[int, int, int]:
    d = local / rel
    return (
        json.loads((d / "meta.json").read_text())["epoch"],
        (d / "model.safetensors").read_bytes()[0],
        json.loads((d / "train_state" / "state.json").read_text())["epoch"],
    )


def _fresh_pulls(mirror: Mirror, tmp_path) -> dict[str, object]:
    """What a new process sees when pulling the run, the trial, or the checkpoint."""
    seen = {}
    for rel in ("", "trials/t0000", CKPT):
        reader = Mirror(mirror.uri, tmp_path / f"reader-{uuid.uuid4().hex[:6]}")
        reader.pull(rel)
        staged_locally = [p for p in reader.local.rglob("*") if ".staged" in p.as_posix() or p.name == ".complete"]
        assert not staged_locally, staged_locally
        seen[rel or "<run>"] = _checkpoint_at(reader.local)
    return seen


def test_push_replaces_a_directory_and_leaves_no_staging_behind(s3_bucket, tmp_path):
    mirror = _mirror(s3_bucket, tmp_path, "replace")
    _write_checkpoint(mirror.local / CKPT, 1)
    mirror.push(CKPT)
    _write_checkpoint(mirror.local / CKPT, 2)
    mirror.push(CKPT)
    fs, base = mirror._fs
    names = {i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File}
    assert names == {f"{CKPT}/meta.json", f"{CKPT}/model.safetensors", f"{CKPT}/train_state/state.json"}
    assert set(_fresh_pulls(mirror, tmp_path).values()) == {(2, 2, 2)}


def test_a_push_killed_while_copying_over_the_old_checkpoint_reads_as_the_new_one(s3_bucket, tmp_path):
    """Staged copy complete, the old ``last`` deleted and only ``meta.json`` copied back:
    every pull takes the staged epoch 2 (weights and train state included)."""
    mirror = _mirror(s3_bucket, tmp_path, "killed-copying")
    _write_checkpoint(mirror.local / CKPT, 1)
    mirror.push(CKPT)
    fs, base = mirror._fs
    new = tmp_path / "epoch2"
    _write_checkpoint(new, 2)
    staged = f"{base}/{CKPT}.staged"
    for f in sorted(p for p in new.rglob("*") if p.is_file()):
        name = f.relative_to(new).as_posix()
        fs.create_dir(f"{staged}/{name}".rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(f"{staged}/{name}") as out:
            out.write(f.read_bytes())
    with fs.open_output_stream(f"{staged}/.complete") as out:
        out.write(b"")
    fs.delete_dir_contents(f"{base}/{CKPT}")
    fs.copy_file(f"{staged}/meta.json", f"{base}/{CKPT}/meta.json")

    assert _fresh_pulls(mirror, tmp_path) == {"<run>": (2, 2, 2), "trials/t0000": (2, 2, 2), CKPT: (2, 2, 2)}


def test_a_push_killed_while_staging_reads_as_the_old_checkpoint(s3_bucket, tmp_path):
    mirror = _mirror(s3_bucket, tmp_path, "killed-staging")
    _write_checkpoint(mirror.local / CKPT, 1)
    mirror.push(CKPT)
    fs, base = mirror._fs
    fs.create_dir(f"{base}/{CKPT}.staged", recursive=True)
    with fs.open_output_stream(f"{base}/{CKPT}.staged/meta.json") as out:
        out.write(json.dumps({"epoch": 2}).encode())  # no .complete: still uploading

    assert set(_fresh_pulls(mirror, tmp_path).values()) == {(1, 1, 1)}


def test_metadata_only_pull_leaves_weights_remote(s3_bucket, tmp_path):
    mirror = _mirror(s3_bucket, tmp_path, "metadata")
    _write_checkpoint(mirror.local / CKPT, 3)
    mirror.push(CKPT)
    reader = Mirror(mirror.uri, tmp_path / "reader")
    reader.pull("", skip_suffixes=(".safetensors",))
    assert (reader.local / CKPT / "meta.json").is_file()
    assert not (reader.local / CKPT / "model.safetensors").exists()


def test_pulls_while_a_writer_replaces_the_checkpoint_never_fail(s3_bucket, tmp_path):
    """``tunecv report`` (or the test that polls a live search) pulls the whole run
    while trials push: a directory whose files vanish under the reader (a replace in
    progress) is read again, alone; retrying the whole run lost the race in CI."""
    import threading

    mirror = _mirror(s3_bucket, tmp_path, "live")
    _write_checkpoint(mirror.local / CKPT, 1)
    mirror.push(CKPT)
    stop, pushed = threading.Event(), []

    def writer() -> None:
        epoch = 1
        while not stop.is_set():
            epoch += 1
            for rel in (CKPT, "trials/t0001/best"):  # two trials' checkpoints, as in a search
                _write_checkpoint(mirror.local / rel, epoch % 250)
                mirror.push(rel)
            pushed.append(epoch)

    thread = threading.Thread(target=writer)
    thread.start()
    pulls = 0
    try:
        # Read until the writer has replaced both checkpoints 10 times (machines differ
        # in speed: count replaces, not seconds), at least 25 reads.
        while (len(pushed) < 10 or pulls < 25) and pulls < 500:
            reader = Mirror(mirror.uri, tmp_path / f"live-reader-{pulls}")
            reader.pull("", skip_suffixes=(".safetensors",))
            assert json.loads((reader.local / CKPT / "meta.json").read_text())["epoch"] >= 0
            pulls += 1
    finally:
        stop.set()
        thread.join()
    assert len(pushed) >= 10, (pulls, len(pushed))
