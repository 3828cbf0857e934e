"""Exporting a checkpoint to a verified, self-contained ONNX bundle (and a TensorRT check).

This module owns the step from a tunecv checkpoint directory to ``out_dir``: the ONNX
conversion (input ``input``, output ``logits``, dynamic batch), ``onnx.checker``, and
the proof that the file is the model that was ranked: ONNX Runtime and PyTorch eager
run side by side over the whole validation split with the checkpoint's own
preprocessing, and the macro-F1 recomputed from the ONNX predictions must equal the one
the checkpoint reported. Only a verified export reaches ``out_dir`` (it is staged next
to it and moved in last). On GPU machines a TensorRT engine is built and checked the
same way. It does not choose the trial to export (``search/results/winner.py``) and does not own
the checkpoint format, preprocessing or metrics: those come from ``trainables``. The
bundle's names, result and README are ``search/export/bundle.py``'s; running a model over a
split and scoring it (the test report too) is ``search/export/scoring.py``'s.
"""

from __future__ import annotations

import json
import os

# ONNX Runtime 1.29+ sends telemetry from Linux too and, at import, writes a device id
# (".ses") into the temporary directory. tunecv's machines have no network and its read
# commands promise to leave nothing behind; set before onnxruntime is first imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.config import Int8Config
from search.export.bundle import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, ExportError, ExportResult, readme_markdown
from search.export.int8 import INT8_FILE, calibration_batches, cpu_int8_flags, int8_gate, quantize_int8
from search.export.scoring import eval_loader, metrics_from_logits, test_report
from search.export.tensorrt import run_tensorrt, tensorrt_unavailable_reason
from trainables.model.checkpoint import load_model, read_meta
from trainables.data.datasets import DataSplit
from trainables.data.images import ALPHA_RULE
from trainables.training.metrics import RANKING_METRIC, EvalMetrics
from trainables.data.transforms import eval_transform_from_spec

# torch 2.14's exporter implements opset 18 and up; asked for 17 it tries a down-conversion
# that fails on timm models (Reduce* axes) and silently keeps 18, so 18 is the honest floor.
MIN_OPSET = DEFAULT_OPSET = 18
METRIC_TOLERANCE = 1e-6
TENSORRT_HINT = "pip install 'tunecv[tensorrt]'"
# Protobuf cannot hold a file over 2 GiB; past 1.5 GB of weights they go to model.onnx.data.
_EXTERNAL_DATA_BYTES = 1_500_000_000
_REQUIRED_META = ("preprocessing", "config", "data_fingerprint", "metrics")


@dataclass(frozen=True)
class _Predictions:
    labels: np.ndarray  # [N]
    eager: np.ndarray  # [N, C] logits
    onnx: np.ndarray  # [N, C] logits


def export_checkpoint(checkpoint_dir: Path, split: DataSplit, out_dir: Path, **options) -> ExportResult:
    """Export ``checkpoint_dir`` (``model.safetensors`` + ``meta.json``) to ONNX in
    ``out_dir`` and prove it reproduces the checkpoint; ``options`` are ``export_model``'s.

    Raises ``export_model``'s errors, and ExportError when the checkpoint lacks metadata or
    ``split`` is other data."""
    checkpoint_dir = Path(checkpoint_dir)
    _check_meta(read_meta(checkpoint_dir), split, checkpoint_dir)
    model, meta = load_model(checkpoint_dir)
    return export_model(model, meta, split, out_dir, **options)


def export_model(
    model: nn.Module,
    meta: dict[str, Any],
    split: DataSplit,
    out_dir: Path,
    *,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 32,
    tensorrt: bool | None = None,
    int8: Int8Config | None = None,
    annotations: dict[str, Any] | None = None,
) -> ExportResult:
    """Export ``model`` (eval, CPU) to ONNX in ``out_dir``; prove it gives the macro-F1 ``meta``
    (a checkpoint's ``meta.json``) reports on ``split``'s validation images. Checkpoints come
    through ``export_checkpoint``, the finalists' ensemble (``search/export/ensemble.py``) here.

    Args:
        split: The split the model was evaluated on.
        out_dir: Where the bundle goes; created if needed, earlier bundle files replaced.
        opset: ONNX opset, at least 18.
        batch_size: Images per verification batch, and the TensorRT profile's largest batch.
        tensorrt: ``None`` builds and checks a TensorRT engine when CUDA and the
            ``tensorrt`` package are present (a failure there is warned about and kept
            in ``ExportResult.tensorrt["error"]``); ``True`` requires it; ``False`` skips it.
        int8: Also quantize to static int8, calibrated on training images, and ship
            ``model.int8.onnx`` if it passes the accuracy gate (``ExportResult.int8`` says).
        annotations: Keys added to ``metrics.json`` as they are: where the checkpoint
            came from ("source"), the finalists' test scores ("finalists").

    Returns:
        The paths and the verification numbers.

    Raises:
        ValueError: ``opset``, ``batch_size`` or ``tensorrt`` has an invalid value.
        ExportError: Conversion or checker fail, the ONNX macro-F1 differs from the
            reported one, or TensorRT was required but is unavailable.
    """
    _check_args(opset, batch_size, tensorrt)
    out_dir = Path(out_dir)
    use_tensorrt = _resolve_tensorrt(tensorrt)
    loader = eval_loader(split, meta, batch_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    onnx_path = staging / ONNX_FILE
    try:
        image_size = meta["preprocessing"]["image_size"]
        actual_opset = export_onnx(model, onnx_path, image_size=image_size, opset=opset)
        session = create_session(onnx_path)
        preds = _predict(model, session, loader)
        onnx_metrics = metrics_from_logits(preds.onnx, preds.labels, meta["class_names"])
        eager_metrics = metrics_from_logits(preds.eager, preds.labels, meta["class_names"])
        _check_macro_f1(onnx_metrics, eager_metrics, preds, meta)
        trt_report = None
        if use_tensorrt:
            trt_report = _tensorrt_report(tensorrt is True, onnx_path, loader, preds, meta)
        int8_report = _int8_report(onnx_path, split, loader, preds, onnx_metrics, meta, int8) if int8 else None
        result = ExportResult(
            out_dir, out_dir / ONNX_FILE, actual_opset, len(preds.labels),
            max_abs_logit_diff=float(np.abs(preds.onnx - preds.eager).max()),
            argmax_agreement=float((preds.onnx.argmax(1) == preds.eager.argmax(1)).mean()),
            onnx_macro_f1=onnx_metrics.macro_f1, eager_macro_f1=eager_metrics.macro_f1,
            reported_macro_f1=float(meta["metrics"][RANKING_METRIC]), tensorrt=trt_report, int8=int8_report,
            test=test_report(session, split, meta, batch_size), annotations=annotations or {},
        )
        _write_bundle(staging, meta, result, onnx_metrics)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def export_onnx(
    model: nn.Module, onnx_path: Path, *, image_size: int, opset: int = DEFAULT_OPSET
) -> int:
    """Convert an eval-mode model to a checker-valid ONNX file with a dynamic batch axis.

    Uses the dynamo (``torch.export``) exporter, torch's default, not the TorchScript
    tracer (deprecated since torch 2.9): it proves the batch axis symbolic or fails here,
    where a tracer can silently bake the example batch size into a Reshape. On timm's
    test_resnet, test_vit, test_efficientnet, test_convnext and resnet10t both exporters
    gave checker-valid models within 3e-7 of eager at batch 1, 5 and 33; dynamo took
    2-5 s instead of about 1 s, and writes byte-identical files run after run.

    Args:
        model: The model, in eval mode, on the CPU.
        onnx_path: The ``.onnx`` file to write.
        image_size: Side of the square input.
        opset: ONNX opset, at least 18.

    Returns:
        The opset of the written file.

    Raises:
        ValueError: ``opset`` is below 18, or the model is in training mode.
        ExportError: Conversion or checker failed, or the graph lacks the expected
            input/output names or a symbolic batch axis.
    """
    import onnx

    _check_opset(opset)
    if model.training:  # BatchNorm and dropout would be exported in their training form
        raise ValueError("export_onnx needs an eval-mode model, got training mode; call .eval().")
    # Batch 2: torch.export specialises example sizes 0 and 1 to constants.
    example = torch.zeros(2, 3, image_size, image_size)
    tensors = (*model.parameters(), *model.buffers())
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    try:
        torch.onnx.export(
            model, (example,), str(onnx_path), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
        )
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except Exception as err:  # noqa: BLE001 - torch.export and onnx fail with many types
        raise ExportError(
            f"could not export {type(model).__name__} to a valid ONNX opset {opset} model with "
            f"a dynamic batch axis ({type(err).__name__}: {err}). Try another opset, or check "
            "that the model's forward does not depend on the batch size."
        ) from err
    proto = onnx.load(str(onnx_path), load_external_data=False)
    _check_signature(proto.graph)
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def create_session(onnx_path: Path, num_threads: int | None = None):
    """An ONNX Runtime CPU session with ``num_threads`` (default: torch's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"opset must be an integer of at least {MIN_OPSET} (the lowest torch's ONNX "
            f"exporter implements), got {opset!r}. Use opset={DEFAULT_OPSET}."
        )


def _check_args(opset: int, batch_size: int, tensorrt: bool | None) -> None:
    _check_opset(opset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if tensorrt not in (None, True, False):
        raise ValueError(f"tensorrt must be None (auto), True or False, got {tensorrt!r}.")


def _check_meta(meta: dict[str, Any], split: DataSplit, checkpoint_dir: Path) -> None:
    missing = [key for key in _REQUIRED_META if key not in meta]
    if not missing and RANKING_METRIC not in meta["metrics"]:
        missing = [f"metrics.{RANKING_METRIC}"]
    if missing:
        raise ExportError(
            f"checkpoint '{checkpoint_dir}' has no {missing} in its meta.json, which export "
            "needs to verify the model; export a checkpoint written by tunecv's training loop."
        )
    if meta["data_fingerprint"] != split.fingerprint():
        raise ExportError(
            f"checkpoint '{checkpoint_dir}' was evaluated on data with fingerprint "
            f"{meta['data_fingerprint'][:12]}, but the split given (root '{split.root}') has "
            f"{split.fingerprint()[:12]}: wrong data. Pass the run's own split "
            "(read_split(RUN_DIR / 'split.parquet'))."
        )


def _check_signature(graph) -> None:
    inputs, outputs = [v.name for v in graph.input], [v.name for v in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"expected one input '{INPUT_NAME}' and one output '{OUTPUT_NAME}', got inputs "
            f"{inputs} and outputs {outputs}; the model's forward must take and return a tensor."
        )
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ExportError(
            f"the exported batch axis is fixed at {batch_dim.dim_value}, expected a symbolic "
            "one; the model's forward must not depend on the batch size."
        )


@torch.inference_mode()
def _predict(model: nn.Module, session, loader) -> _Predictions:
    labels, eager, onnx_logits = [], [], []
    for x, y in loader:
        eager.append(model(x).float().numpy())
        onnx_logits.append(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        labels.append(y.numpy())
    if not labels:
        raise ExportError("the split has no validation images; export needs some to verify.")
    return _Predictions(np.concatenate(labels), np.concatenate(eager), np.concatenate(onnx_logits))


def _check_macro_f1(onnx_m: EvalMetrics, eager_m: EvalMetrics, preds: _Predictions, meta) -> None:
    reported = float(meta["metrics"][RANKING_METRIC])
    if abs(onnx_m.macro_f1 - reported) <= METRIC_TOLERANCE:
        return
    flipped = int((preds.onnx.argmax(1) != preds.eager.argmax(1)).sum())
    if abs(eager_m.macro_f1 - reported) <= METRIC_TOLERANCE:
        cause = (
            f"PyTorch eager reproduces it, but ONNX Runtime predicts {flipped} image(s) "
            f"differently: the export of '{meta['backbone']}' is not faithful. Try another opset."
        )
    else:
        cause = (
            f"PyTorch eager (fp32) gives {eager_m.macro_f1:.6f} as well, so the weights, "
            "preprocessing or metrics in the checkpoint are not those that were evaluated. "
            "Export an unmodified checkpoint."
        )
    raise ExportError(
        f"expected the ONNX macro-F1 to equal the checkpoint's reported {reported:.6f} within "
        f"{METRIC_TOLERANCE:g}, got {onnx_m.macro_f1:.6f} over {len(preds.labels)} validation "
        f"images. {cause}"
    )


def _int8_report(onnx_path: Path, split: DataSplit, loader, preds: _Predictions, fp32_m: EvalMetrics, meta,
                 options: Int8Config) -> dict:
    """Quantize next to ``onnx_path``, score int8 against fp32 ONNX over the whole
    validation split, and delete the int8 file unless it passes the gate."""
    names = meta["class_names"]
    int8_path = onnx_path.parent / INT8_FILE
    try:
        batches = calibration_batches(split, eval_transform_from_spec(meta["preprocessing"]), options)
        quantize_int8(onnx_path, int8_path, batches, options, INPUT_NAME)
        session = create_session(int8_path)
        logits = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] for x, _ in loader])
    except Exception as err:  # noqa: BLE001 - the quantizer fails in many ways; the verified fp32 stays
        int8_path.unlink(missing_ok=True)
        warnings.warn(f"int8 quantization failed, fp32 export kept: {err}", RuntimeWarning, 2)
        return {"shipped": False, "refused": f"quantization failed ({type(err).__name__}: {err})"}
    int8_m = metrics_from_logits(logits, preds.labels, names)
    report = int8_gate(
        fp32_m.macro_f1, int8_m.macro_f1, {n: c.f1 for n, c in fp32_m.per_class.items()},
        {n: c.f1 for n, c in int8_m.per_class.items()},
        float((logits.argmax(1) == preds.onnx.argmax(1)).mean()), options, cpu_int8_flags(),
    )
    if not report["shipped"]:
        int8_path.unlink()
        warnings.warn(report["refused"], RuntimeWarning, 2)
    return report


def _write_bundle(staging: Path, meta: dict, result: ExportResult, onnx_m: EvalMetrics) -> None:
    verification = {
        "num_images": result.num_images, "max_abs_logit_diff": result.max_abs_logit_diff,
        "argmax_agreement": result.argmax_agreement, "onnx": onnx_m.scalars(),
        "eager_macro_f1": result.eager_macro_f1, "reported_macro_f1": result.reported_macro_f1,
        "tolerance": METRIC_TOLERANCE, "opset": result.opset,
        "exporter": f"torch.onnx dynamo, torch {torch.__version__}", "tensorrt": result.tensorrt,
        "int8": result.int8,
    }
    files = {
        "class_names.json": meta["class_names"],
        # A checkpoint from before the "alpha" field was decoded by the same rule.
        "preprocessing.json": {"alpha": ALPHA_RULE, **meta["preprocessing"]},
        # "test": the held-out score users should quote; the rest is the validation epoch
        # that chose this model (optimistic: it won a search on those images).
        "metrics.json": {**meta["metrics"], "ranking_metric": RANKING_METRIC,
                         "verification": verification, "test": result.test,
                         **(result.annotations or {})},
        "config.json": meta["config"],
    }
    for name, payload in files.items():
        (staging / name).write_text(json.dumps(payload, indent=2) + "\n")
    (staging / "fingerprint.txt").write_text(meta["data_fingerprint"] + "\n")
    (staging / "README.md").write_text(readme_markdown(meta, result))


def _publish(staging: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # A previous export's files this one does not have: larger weights, a shipped int8 model.
    for stale in (out_dir / f"{ONNX_FILE}.data", out_dir / INT8_FILE):
        if stale.exists() and not (staging / stale.name).exists():
            stale.unlink()
    for path in staging.iterdir():
        os.replace(path, out_dir / path.name)


# --- TensorRT: GPU machines only (the engine itself lives in search/export/tensorrt.py) ---


def _resolve_tensorrt(requested: bool | None) -> bool:
    """Whether to run the TensorRT check; refuses ``True`` early when it cannot run."""
    if requested is False:
        return False
    why_not = tensorrt_unavailable_reason()
    if why_not and requested:
        raise ExportError(
            f"tensorrt=True needs a CUDA GPU and the tensorrt package, but {why_not}. On a GPU "
            f"machine run `{TENSORRT_HINT}`, or pass tensorrt=None to check it where possible."
        )
    return why_not is None


def _tensorrt_report(required: bool, onnx_path: Path, loader, preds: _Predictions, meta) -> dict:
    """The TensorRT check; in auto mode a failure is recorded and warned about, not raised.

    The ONNX export is verified by then, so a TensorRT problem (an unsupported layer, an
    API change between TensorRT versions) must not cost the user the export.
    """
    try:
        return _verify_tensorrt(onnx_path, loader, preds, meta)
    except Exception as err:  # noqa: BLE001 - recorded in metrics.json and warned about
        if required:
            raise ExportError(f"the TensorRT check failed ({type(err).__name__}: {err}).") from err
        warnings.warn(f"TensorRT check failed, ONNX export kept: {err}", RuntimeWarning, 2)
        return {"error": f"{type(err).__name__}: {err}"}


def _verify_tensorrt(onnx_path: Path, loader, preds: _Predictions, meta) -> dict:
    """Run the engine over the validation split and compare it with PyTorch eager."""
    logits, info = run_tensorrt(
        onnx_path, loader, INPUT_NAME, OUTPUT_NAME,
        num_classes=len(meta["class_names"]), image_size=meta["preprocessing"]["image_size"],
    )
    return {
        **info,
        "max_abs_logit_diff": float(np.abs(logits - preds.eager).max()),
        "argmax_agreement": float((logits.argmax(1) == preds.eager.argmax(1)).mean()),
        "macro_f1": metrics_from_logits(logits, preds.labels, meta["class_names"]).macro_f1,
    }
