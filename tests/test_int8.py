"""Static int8 export on a digits winner (resnet10t trained in-process, no Ray): the QDQ
model passes the checker, its gate is computed on the whole validation split, and a
model that loses more than ``max_drop`` is refused while fp32 ships."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from search.config import Int8Config, parse_config
from search.export.int8 import INT8_FILE
from search.export.bundle import ONNX_FILE
from search.export.onnx import create_session, export_checkpoint
from search.export.scoring import eval_loader
from search.jobs.train import train
from tests.conftest import small_run_config
from trainables.model.checkpoint import read_meta
from trainables.data.split_files import read_split
from trainables.data.demo_data import write_digits


@pytest.fixture(scope="module")
def winner(tmp_path_factory):
    """A resnet10t trained 3 epochs on scikit-learn's digits at 32 px (macro-F1 ~0.97)."""
    work = tmp_path_factory.mktemp("int8")
    write_digits(work / "digits", image_size=32)
    cfg = parse_config(small_run_config(
        work / "digits", work / "runs", model={"backbone": "resnet10t", "pretrained": False},
        optim={"epochs": 3, "batch_size": 64, "lr_head": 3e-3, "lr_base": 3e-3, "warmup_epochs": 0.2}))
    run_dir = train(cfg, print_fn=lambda *_: None)
    return run_dir / "best", read_split(str(run_dir / "split.parquet"))


def _ort_macro_f1(model_path: Path, checkpoint: Path, split) -> tuple[float, int]:
    """Macro-F1 of ``model_path`` over the whole validation split, computed here."""
    session = create_session(model_path)
    labels, preds = [], []
    for x, y in eval_loader(split, read_meta(checkpoint), batch_size=64):
        preds.append(session.run(["logits"], {"input": x.numpy()})[0].argmax(1))
        labels.append(y.numpy())
    labels, preds = np.concatenate(labels), np.concatenate(preds)
    return f1_score(labels, preds, average="macro"), len(labels)


def test_a_shipped_int8_model_is_checked_qdq_and_reproduces_its_reported_macro_f1(winner, tmp_path):
    checkpoint, split = winner
    out = tmp_path / "export"
    result = export_checkpoint(checkpoint, split, out, int8=Int8Config(max_drop=100.0))
    check = result.int8
    assert check["shipped"] and (out / INT8_FILE).is_file() and (out / ONNX_FILE).is_file()
    onnx.checker.check_model(str(out / INT8_FILE), full_check=True)
    model = onnx.load(str(out / INT8_FILE))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights  # convolution weights stored as int8, not only the head
    # Per-channel: a weight's scale has one value per output channel.
    scales = {t.name: t for t in model.graph.initializer}
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1
               for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
               {w.name for w in int8_weights})

    f1, num_images = _ort_macro_f1(out / INT8_FILE, checkpoint, split)
    assert num_images == len(split.val) > 300  # the whole validation split, about 20 % of 1,797
    assert check["macro_f1"] == pytest.approx(f1, abs=1e-12)
    assert check["fp32_macro_f1"] == pytest.approx(result.onnx_macro_f1, abs=1e-12)
    assert check["macro_f1_drop_points"] == pytest.approx(100 * (result.onnx_macro_f1 - f1), abs=1e-9)
    assert 0.9 < check["argmax_agreement"] <= 1.0
    assert check["calibration"] == {"images": 256, "method": "minmax", "split": "train", "seed": 0}
    assert set(check["cpu_flags"]) >= {"avx512_vnni", "avx_vnni", "amx_int8"}
    saved = json.loads((out / "metrics.json").read_text())["verification"]["int8"]
    assert saved["macro_f1"] == check["macro_f1"] and saved["shipped"]
    assert INT8_FILE in (out / "README.md").read_text()


def test_an_int8_model_that_loses_more_than_max_drop_is_refused_and_fp32_ships(winner, tmp_path):
    checkpoint, split = winner
    out = tmp_path / "export"
    # Calibrated on one black image, every activation range is that image's: real digits
    # clip, and int8 loses points on any CPU. (A single real image, clipped by the
    # percentile method, flipped one prediction of ~360 on one machine and none on another.)
    # A copy of the data whose training images are black: the split, and so its
    # fingerprint, stays the run's; validation images stay real.
    root = tmp_path / "digits"
    shutil.copytree(split.root, root)
    for sample in split.train:
        Image.new("RGB", (32, 32)).save(root / sample.path)
    black = dataclasses.replace(split, root=str(root))
    with pytest.warns(RuntimeWarning, match="more than max_drop 0"):
        result = export_checkpoint(checkpoint, black, out, int8=Int8Config(calibration_images=1, max_drop=0.0))
    check = result.int8
    assert check["macro_f1_drop_points"] > 5  # 69 points here: far from any machine's rounding
    assert not check["shipped"] and check["file"] is None
    assert not (out / INT8_FILE).exists() and (out / ONNX_FILE).is_file()
    worst = check["largest_class_drop"]
    assert worst["points"] > 0 and f"'{worst['class']}': {round(worst['points'], 3)}" in check["refused"]
    assert "Kept fp32 only" in check["refused"]
    assert "refused" in (out / "README.md").read_text()


def test_int8_options_are_checked_before_any_work(tmp_path, tunecv_here):
    bad = tunecv_here("export", tmp_path / "no-run", "--int8", "--int8-method", "kl")
    assert bad.returncode == 2 and "--int8-method: Input should be 'minmax', 'entropy' or 'percentile'" in bad.stderr
    bad = tunecv_here("export", tmp_path / "no-run", "--int8-images", "8")
    assert bad.returncode == 2 and "--int8-images need --int8" in bad.stderr
    with pytest.raises(ValueError, match="max_drop"):
        Int8Config(max_drop=-1)
