"""An export bundle's interface and what it says to a user: the ONNX file's name, its
input and output names, the verified result (``ExportResult``, the numbers in
``metrics.json``) and the bundle's ``README.md``. ``search/export/onnx.py`` makes the
bundle; the retrain gate and serving code read it by these names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.export.int8 import INT8_FILE
from search.markdown import md_text
from trainables.data.images import ALPHA_RULE

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_FILE = "model.onnx"


class ExportError(RuntimeError):
    """The checkpoint could not be exported, or the export does not reproduce it."""


@dataclass(frozen=True)
class ExportResult:
    """A verified export and the numbers that verified it."""

    out_dir: Path
    onnx_path: Path
    opset: int
    num_images: int  # validation images both runtimes saw
    max_abs_logit_diff: float  # ONNX Runtime vs PyTorch eager, both fp32
    argmax_agreement: float  # share of images where both predict the same class
    onnx_macro_f1: float
    eager_macro_f1: float
    reported_macro_f1: float  # from the checkpoint's meta.json
    tensorrt: dict[str, Any] | None  # engine precision and agreement; None when not run
    int8: dict[str, Any] | None = None  # the static int8 check (search/export/int8.py); None when not asked
    test: dict[str, Any] | None = None  # the fp32 ONNX model on the held-out test split; None without one
    annotations: dict[str, Any] | None = None  # extra metrics.json keys (search/results/winner.py)


def readme_markdown(meta: dict[str, Any], result: ExportResult) -> str:
    """The bundle's ``README.md``: how to feed the model and read its output, for ``meta`` (a checkpoint's)."""
    spec, names = meta["preprocessing"], meta["class_names"]
    size = spec["image_size"]
    if spec["resize_mode"] == "center_crop":
        short = int(size / spec["crop_pct"])  # e.g. 64 / 0.875 -> 73
        resize = f"shorter side to {short} px (aspect kept), then cut the central {size}x{size}"
    else:
        resize = f"longer side to {size} px (aspect kept), then zero-pad, centred, to {size}x{size}"
    shape = f"{INPUT_NAME}:{{}}x3x{size}x{size}"
    return f"""# {md_text(meta['backbone'])} image classifier (ONNX)

Exported by tunecv; verified on {result.num_images} validation images: ONNX macro-F1
{result.onnx_macro_f1:.6f} equals the reported {result.reported_macro_f1:.6f}, largest logit
difference to PyTorch {result.max_abs_logit_diff:.1e}. Serving it needs nothing from tunecv.
{_test_line(result)}
`model.onnx` (opset {result.opset}){_int8_line(result)}; `class_names.json` (output index -> name);
`preprocessing.json` (the steps below); `metrics.json`, `config.json`, `fingerprint.txt`
(quality, training config, identity of the data).

## Input `{INPUT_NAME}`: float32 [batch, 3, {size}, {size}], NCHW, any batch size
1. Decode as 8-bit {spec.get('color', 'RGB')} with the EXIF orientation applied (PIL: `ImageOps.exif_transpose`).
   Transparency is composited onto white, as in training (`"alpha": "{ALPHA_RULE}"`): an image
   with an alpha channel or a transparent colour (`"transparency"` in PIL's `image.info`) becomes
   `image.convert("RGBA")`, then each of R, G, B becomes round((c * a + 255 * (255 - a)) / 255).
2. Resize (OpenCV INTER_LINEAR; PIL antialiases and differs) the {resize} px.
3. Divide by 255, subtract mean {list(spec['mean'])}, divide by std {list(spec['std'])} (R, G, B).
4. Transpose HWC -> CHW; stack images into a batch.

## Output `{OUTPUT_NAME}`: float32 [batch, {len(names)}], unnormalised scores
Softmax gives probabilities. Class order: {", ".join(f"{i} = {md_text(n)}" for i, n in enumerate(names))}.

```python
import json, onnxruntime as ort
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": batch}})[0]
names = json.load(open("class_names.json")); print([names[i] for i in logits.argmax(1)])
```

TensorRT engines are tied to a GPU and TensorRT version; build one on the serving machine:
`trtexec --onnx=model.onnx --minShapes={shape.format(1)} --optShapes={shape.format(32)} \\
--maxShapes={shape.format(32)} --fp16 --saveEngine=model.plan`
"""


def _test_line(result: ExportResult) -> str:
    """The held-out score: the number to quote, since validation chose this model."""
    if not result.test:
        return ("No held-out test split (data.test_fraction: 0): the validation macro-F1 above chose\n"
                "this model and is optimistic.\n")
    test, interval = result.test, result.test["macro_f1_interval"]
    return (f"On {test['num_images']} held-out test images, which the search never saw: macro-F1 "
            f"{test['macro_f1']:.4f}\n(95 % bootstrap interval {interval['low']:.4f}-{interval['high']:.4f}; "
            "per class in metrics.json, \"test\").\n")


def _int8_line(result: ExportResult) -> str:
    check = result.int8
    if not check:
        return ""
    if not check.get("shipped"):
        return " (an int8 model was built and refused: see metrics.json, verification.int8)"
    return (f"; `{INT8_FILE}`, static int8 (QDQ), same input and output: macro-F1 {check['macro_f1']:.4f} "
            f"against fp32's {check['fp32_macro_f1']:.4f}, argmax agreement {check['argmax_agreement']:.4f}"
            + (f". Note: {check['speed_note']}" if check.get("speed_note") else ""))
