"""``tunecv data pack``: a run's split written as Parquet shards of encoded images, locally
and into a bucket (moto's S3 server); and the checks that refuse a bad pack or a run
file that does not fit its pack, before any compute."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from search.cli import main
from search.config import ConfigError, parse_config
from tests.conftest import small_run_config
from trainables.data.datasets import DataSplit, prepare_split
from trainables.data.locations import resolve_location
from trainables.data.packs import PACK_JSON, Pack, PackFile, read_pack, read_pack_split


def _fake_pack(directory, val_fraction=0.2, seed=0):
    """A pack.json alone: what the config checks read (no Ray, no images)."""
    directory.mkdir(parents=True, exist_ok=True)
    pack = Pack(str(directory), "f" * 64, val_fraction, seed, (PackFile("split=train/a.parquet", 10),), ())
    (directory / PACK_JSON).write_text(json.dumps(pack.to_json()))
    return directory


def _ray_data_config(root, tmp_path, **data):
    return small_run_config(root, tmp_path / "runs", data={"loader": "ray_data", "num_workers": 1, **data})


def test_ray_data_without_a_pack_names_data_root(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root: no pack at .*tunecv data pack"):
        parse_config(_ray_data_config(synthetic_root, tmp_path))


def test_a_pack_made_with_another_split_names_the_field_and_the_value(tmp_path):
    root = _fake_pack(tmp_path / "pack", val_fraction=0.25, seed=3)
    with pytest.raises(ConfigError) as caught:
        parse_config(_ray_data_config(root, tmp_path))
    message = str(caught.value)
    assert "data.val_fraction: 0.2 differs from the pack's 0.25" in message
    assert "optim.seed: 0 differs from the seed the pack's split was made with (3)" in message
    parse_config(_ray_data_config(root, tmp_path, val_fraction=0.25) | {"optim": {"seed": 3}})  # fits: accepted


def test_a_pack_read_through_the_dataloader_and_unsupported_combinations_are_refused(tmp_path):
    root = _fake_pack(tmp_path / "pack")
    with pytest.raises(ConfigError, match=r"data\.loader: data\.root .* is a pack"):
        parse_config(small_run_config(root, tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"data\.manifest is not supported with data\.loader ray_data"):
        parse_config(_ray_data_config(root, tmp_path, manifest=str(root / PACK_JSON)))


def test_a_non_empty_out_is_refused_before_any_work(synthetic_root, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(small_run_config(synthetic_root, tmp_path / "runs")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["data", "pack", str(out), "--config", str(config)]) == 2
    assert "is not empty (1 entries: old.txt); nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert not (tmp_path / "runs").exists()  # not even the scan cache: nothing was read


def _check_pack_holds(pack: Pack, split: DataSplit) -> None:
    """Every row of the split is in the pack once, with its label, path and bytes."""
    fs, base = resolve_location(pack.location)
    for name, samples, files in (("train", split.train, pack.train), ("val", split.val, pack.val)):
        assert sum(f.rows for f in files) == len(samples)
        seen = set()
        for f in files:
            table = pq.read_table(f"{base.rstrip('/')}/{f.path}", filesystem=fs)
            assert table.num_rows == f.rows and f.path.startswith(f"split={name}/")
            for row, path, label, sha1, image in zip(*(table.column(c).to_pylist()
                                                       for c in ("row", "path", "label", "sha1", "image"))):
                sample = samples[row]
                assert (path, label, sha1) == (sample.path, sample.label, sample.sha1)
                assert hashlib.sha1(image).hexdigest() == sha1
                seen.add(row)
        assert seen == set(range(len(samples)))
    assert pack.fingerprint == split.fingerprint() and read_pack_split(pack) == split


@pytest.fixture(scope="module")
def ray_after_s3(s3_bucket):
    """Ray started after the bucket's AWS_* variables are set, so its workers see them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_bucket
    ray.shutdown()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_pack_holds_the_split_row_for_row(where, ray_after_s3, synthetic_root, tmp_path):
    from search.jobs.pack import pack_dataset

    out = str(tmp_path / "pack") if where == "local" else f"{ray_after_s3}/packs/{tmp_path.name}"
    cfg = parse_config(small_run_config(synthetic_root, tmp_path / "runs"))
    lines = []
    pack = pack_dataset(cfg, out, lines.append, rows_per_file=32)
    # 160 images, 20 % held out per class by hash: 130 train in 5 files of 32 (the last 2), 30 val in 1.
    assert [f.rows for f in pack.train] == [32] * 4 + [2] and [f.rows for f in pack.val] == [30]
    assert read_pack(out) == pack and (pack.val_fraction, pack.seed) == (0.2, 0)
    # The split as `tunecv train` makes it from the images, without the pack.
    _check_pack_holds(pack, prepare_split(synthetic_root, val_fraction=0.2, seed=0))
    assert any("pack: wrote" in line for line in lines)
    # The run file that reads the pack fits it, and the split a run would use is the pack's.
    from search.data import scan_data

    run_cfg = parse_config(small_run_config(out, tmp_path / "runs", data={"loader": "ray_data", "num_workers": 1}))
    assert scan_data(run_cfg, lines.append).fingerprint() == pack.fingerprint
