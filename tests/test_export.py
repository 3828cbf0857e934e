"""ONNX export: a real checkpoint, real torch.onnx, real ONNX Runtime, no mocks."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from PIL import Image

from search.config import Int8Config
from search.export.bundle import ExportError
from search.export.onnx import TENSORRT_HINT, create_session, export_checkpoint
from trainables.model.backbones import data_config
from trainables.model.checkpoint import META_FILE, load_model, save_checkpoint
from trainables.data.datasets import DataSplit, ImageDataset, Sample, prepare_split
from trainables.data.demo_data import write_synthetic
from trainables.data.images import ALPHA_RULE, DEFAULT_MAX_PIXELS
from trainables.data.loaders import create_val_loader
from trainables.training.loop import evaluate
from trainables.training.metrics import RANKING_METRIC
from trainables.runtime.ranks import local_runtime
from trainables.data.transforms import create_eval_transform, eval_transform_from_spec, preprocessing_spec

BUNDLE_FILES = (
    "model.onnx", "class_names.json", "preprocessing.json", "metrics.json", "config.json",
    "fingerprint.txt", "README.md",
)


def _tensorrt_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _fit_briefly(model: torch.nn.Module, split: DataSplit, transform, steps: int) -> None:
    """A few full-batch Adam steps, so predictions differ across images and classes."""
    if steps == 0:
        return
    train = ImageDataset(split.root, split.train, transform)
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor(train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()


def make_checkpoint(
    directory: Path, split: DataSplit, backbone: str, image_size: int, fit_steps: int = 10
) -> dict:
    """Fit a tiny timm model briefly, evaluate it on ``split``, save a tunecv checkpoint."""
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=len(split.class_names))
    pre = data_config(model)
    args = (image_size, "center_crop", pre["mean"], pre["std"], pre["crop_pct"])
    spec, transform = preprocessing_spec(*args), create_eval_transform(*args)
    _fit_briefly(model, split, transform, fit_steps)
    runtime = local_runtime(False)
    loader, _ = create_val_loader(
        split, transform, batch_size=8, num_workers=0, runtime=runtime,
        max_pixels=DEFAULT_MAX_PIXELS,
    )
    metrics = evaluate(model, loader, runtime, list(split.class_names))
    meta = {
        "class_names": list(split.class_names),
        "backbone": backbone,
        "preprocessing": spec,
        "config": {},
        "data_fingerprint": split.fingerprint(),
        "metrics": metrics.scalars(),
    }
    save_checkpoint(directory, model, meta)
    return meta


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-data")
    write_synthetic(root, num_classes=3, images_per_class=20, image_size=32)
    return root


@pytest.fixture(scope="module")
def split(data_root) -> DataSplit:
    return prepare_split(data_root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, split) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(directory, split, "test_resnet", 32)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint, split):
    """The export of ``checkpoint``, and torch's thread count before and after it."""
    threads_before = torch.get_num_threads()
    out_dir = tmp_path_factory.mktemp("out") / "export"
    result = export_checkpoint(checkpoint, split, out_dir, batch_size=5)  # 12 images: 3 batches
    return result, threads_before, torch.get_num_threads()


def test_export_passes_the_checker_with_named_io(exported):
    result, _, _ = exported
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    model = onnx.load(str(result.onnx_path))
    assert [v.name for v in model.graph.input] == ["input"]
    assert [v.name for v in model.graph.output] == ["logits"]
    assert result.opset >= 17


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_axis_is_dynamic(exported, checkpoint, batch):
    result, _, _ = exported
    model, _ = load_model(checkpoint)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    logits = create_session(result.onnx_path).run(["logits"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        expected = model(x).numpy()
    assert logits.shape == (batch, 3)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_bundle_files_hold_the_checkpoint_metadata(exported, checkpoint, split):
    result, _, _ = exported
    meta = json.loads((checkpoint / META_FILE).read_text())
    for name in BUNDLE_FILES:
        assert (result.out_dir / name).is_file(), name
    assert not list(result.out_dir.parent.glob(".export-*")), "staging directory left behind"
    out = result.out_dir
    assert json.loads((out / "class_names.json").read_text()) == list(split.class_names)
    assert json.loads((out / "preprocessing.json").read_text()) == meta["preprocessing"]
    assert json.loads((out / "config.json").read_text()) == {}
    assert (out / "fingerprint.txt").read_text().strip() == split.fingerprint()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[RANKING_METRIC] == meta["metrics"][RANKING_METRIC]
    assert metrics["verification"]["max_abs_logit_diff"] == result.max_abs_logit_diff
    assert metrics["verification"]["onnx"][RANKING_METRIC] == result.onnx_macro_f1
    readme = (out / "README.md").read_text()
    mean_r = str(meta["preprocessing"]["mean"][0])
    for needle in ("NCHW", "float32", "input", "logits", *split.class_names, mean_r):
        assert needle in readme, needle


def test_onnx_logits_match_eager_over_the_whole_val_split(exported, split):
    result, _, _ = exported
    assert result.num_images == len(split.val) > 0  # every validation image
    assert result.max_abs_logit_diff < 1e-4
    assert result.argmax_agreement == 1.0


def test_onnx_macro_f1_equals_reported(exported, checkpoint):
    result, _, _ = exported
    reported = json.loads((checkpoint / META_FILE).read_text())["metrics"][RANKING_METRIC]
    assert result.reported_macro_f1 == reported
    assert abs(result.onnx_macro_f1 - reported) <= 1e-6
    assert 0.0 < result.onnx_macro_f1 <= 1.0


def test_export_leaves_torch_threads_alone(exported):
    _, before, after = exported
    assert before == after


def test_tampered_reported_metric_is_refused(tmp_path, checkpoint, split):
    tampered = tmp_path / "ckpt"
    shutil.copytree(checkpoint, tampered)
    meta = json.loads((tampered / META_FILE).read_text())
    meta["metrics"][RANKING_METRIC] = meta["metrics"][RANKING_METRIC] - 0.05
    (tampered / META_FILE).write_text(json.dumps(meta))
    out_dir = tmp_path / "out"
    with pytest.raises(ExportError, match="expected the ONNX macro-F1 to equal") as info:
        export_checkpoint(tampered, split, out_dir)
    assert "PyTorch eager (fp32) gives" in str(info.value)
    assert not out_dir.exists(), "an unverified export must not reach out_dir"


def test_an_ensemble_exports_as_one_graph_that_averages_its_members(tmp_path, checkpoint, split):
    """The finalists' ensemble (search/export/ensemble.py) goes through the same export:
    one ONNX graph whose logits are its members' mean, verified against the validation
    macro-F1 the ensemble's PyTorch form scored."""
    from search.export.ensemble import LogitMean
    from search.export.onnx import export_model
    from search.export.scoring import eval_loader, metrics_from_logits

    other = tmp_path / "other"
    make_checkpoint(other, split, "test_resnet", 32, fit_steps=4)  # another member: fewer steps, other logits
    (first, meta), (second, _) = load_model(checkpoint), load_model(other)
    ensemble = LogitMean([first, second]).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ((first(x) + second(x)) / 2).numpy()
        assert np.abs(first(x).numpy() - second(x).numpy()).max() > 1e-3  # the members differ
        logits, labels = zip(*[(ensemble(v).numpy(), y.numpy()) for v, y in eval_loader(split, meta, 8)])
    scored = metrics_from_logits(np.concatenate(logits), np.concatenate(labels), meta["class_names"])
    result = export_model(ensemble, {**meta, "metrics": scored.scalars()}, split, tmp_path / "export", tensorrt=False,
                          int8=Int8Config(max_drop=100.0))
    assert abs(result.onnx_macro_f1 - scored.macro_f1) <= 1e-6 and result.argmax_agreement == 1.0
    served = create_session(result.onnx_path).run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    # The int8 path quantizes the one graph, both members in it, and gates it like any model.
    assert result.int8["shipped"], result.int8
    int8 = create_session(result.out_dir / "model.int8.onnx").run(["logits"], {"input": x.numpy()})[0]
    assert int8.shape == expected.shape and 0 < result.int8["argmax_agreement"] <= 1  # over the validation images


def test_other_split_is_refused_as_wrong_data(tmp_path, checkpoint, data_root):
    other = prepare_split(data_root, seed=1)
    with pytest.raises(ExportError, match="wrong data"):
        export_checkpoint(checkpoint, other, tmp_path / "out")


def test_opset_below_18_is_refused(tmp_path, checkpoint, split):
    with pytest.raises(ValueError, match="at least 18"):
        export_checkpoint(checkpoint, split, tmp_path / "out", opset=17)


@pytest.mark.skipif(_tensorrt_ready(), reason="CUDA and tensorrt are present: the gpu test runs it")
def test_tensorrt_required_without_gpu_gives_install_hint(tmp_path, checkpoint, split):
    with pytest.raises(ExportError, match="needs a CUDA GPU") as info:
        export_checkpoint(checkpoint, split, tmp_path / "out", tensorrt=True)
    assert TENSORRT_HINT in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _tensorrt_ready(), reason=f"needs a CUDA GPU and the tensorrt package ({TENSORRT_HINT})"
)
def test_tensorrt_engine_agrees_with_eager(tmp_path, checkpoint, split):
    result = export_checkpoint(checkpoint, split, tmp_path / "out", tensorrt=True)
    trt = result.tensorrt
    assert trt["precision"] in ("fp16", "fp32")
    assert trt["argmax_agreement"] >= 0.9  # fp16 may flip a near-tie
    assert trt["max_abs_logit_diff"] < (5e-2 if trt["precision"] == "fp16" else 1e-3)


def test_vit_family_exports_and_verifies(tmp_path, split):
    # load_model builds test_vit at its default 160 px; the eval transform upsizes 32 px images.
    make_checkpoint(tmp_path / "ckpt", split, "test_vit", 160, fit_steps=0)
    result = export_checkpoint(tmp_path / "ckpt", split, tmp_path / "out", tensorrt=False)
    assert result.max_abs_logit_diff < 1e-4
    assert result.argmax_agreement == 1.0
    assert abs(result.onnx_macro_f1 - result.reported_macro_f1) <= 1e-6


def test_the_retrain_gate_scores_a_bundle_on_the_held_out_test_split(exported, data_root):
    """The gate compares champion and challenger on the new snapshot's test images (kept
    out of every search; like validation, picked by path, so they keep their side)."""
    from search.retrain.gate import decide, describe, score_bundle

    result, _, _ = exported
    held_out = prepare_split(data_root, test_fraction=0.2)
    score = score_bundle(result.out_dir, held_out)
    assert score.scored_on == "test" and score.num_images == len(held_out.test) != len(held_out.val)
    whole = prepare_split(data_root)
    plain = score_bundle(result.out_dir, whole)
    assert plain.scored_on == "val" and plain.num_images == len(whole.val) > 0
    assert "held-out test split" in describe(decide(score, None, None, min_gain=0.0, max_class_drop=0.1))
    assert "it has no test split" in describe(decide(plain, None, None, min_gain=0.0, max_class_drop=0.1))


def _rgba_with_garbage_under_transparency(path: Path, short: int) -> Path:
    """A 2:1 RGBA PNG: a transparent third whose RGB is noise, a third fading in, an opaque third."""
    rng = np.random.default_rng(0)
    height, width = 2 * short, 4 * short  # resized by exactly 1/2: no rounding to agree on
    rgba = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    third = width // 3
    rgba[:, :third, 3] = 0
    rgba[:, third:2 * third, 3] = np.linspace(1, 254, third).astype(np.uint8)
    rgba[:, 2 * third:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _served_input(path: Path, spec: dict, drop_alpha: bool = False) -> np.ndarray:
    """The input a server builds from the bundle's preprocessing.json and README alone:
    PIL, NumPy and OpenCV, nothing from tunecv."""
    import cv2
    from PIL import ImageOps

    assert (spec["color"], spec["resize_mode"], spec["layout"]) == ("RGB", "center_crop", "NCHW")
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if drop_alpha:  # what the README said before: the noise under alpha 0 shows
            rgb = np.asarray(image.convert("RGB"))
        else:
            assert spec["alpha"] == "composite_on_white"
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
            colour, alpha = rgba[..., :3], rgba[..., 3:]
            rgb = np.rint((colour * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)
    size, short = spec["image_size"], int(spec["image_size"] / spec["crop_pct"])
    height, width = rgb.shape[:2]
    scale = short / min(height, width)
    rgb = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
    top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    crop = rgb[top:top + size, left:left + size].astype(np.float32) / 255
    x = (crop - np.float32(spec["mean"])) / np.float32(spec["std"])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def test_an_rgba_image_gives_the_same_logits_served_as_documented_as_in_pytorch(exported, checkpoint, tmp_path):
    """Serving skew (issue 27): training composites alpha onto white; the bundle must say
    so, and a server following it must feed the model what evaluation feeds it."""
    import onnxruntime as ort

    result, _, _ = exported
    spec = json.loads((result.out_dir / "preprocessing.json").read_text())
    assert spec["alpha"] == ALPHA_RULE == "composite_on_white"
    readme = (result.out_dir / "README.md").read_text()
    assert "composited onto white" in readme and "alpha dropped" not in readme
    path = _rgba_with_garbage_under_transparency(tmp_path / "rgba.png", int(spec["image_size"] / spec["crop_pct"]))
    # PyTorch: the checkpoint's model on what evaluation and export verification read.
    model, meta = load_model(checkpoint)
    transform = eval_transform_from_spec(meta["preprocessing"])
    dataset = ImageDataset(str(tmp_path), [Sample("rgba.png", 0, "")], transform)
    with torch.inference_mode():
        eager = model(dataset[0][0][None]).numpy()
    session = ort.InferenceSession(str(result.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(["logits"], {"input": _served_input(path, spec)})[0]
    np.testing.assert_allclose(served, eager, atol=1e-4)
    dropped = session.run(["logits"], {"input": _served_input(path, spec, drop_alpha=True)})[0]
    assert np.abs(dropped - eager).max() > 1e-2, "the image does not tell the two rules apart"
