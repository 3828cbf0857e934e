"""Static int8 for CPU serving: ONNX Runtime's own quantizer (``quant_pre_process``, then
``quantize_static`` in QDQ format with per-channel weights), calibrated on training
images only, and an accuracy gate on the whole validation split. The int8 model ships
only when its macro-F1 is within ``max_drop`` points of the fp32 ONNX model's; otherwise
the bundle keeps fp32 alone and says which classes lost what.

Dynamic quantization (Linear layers only) gave CNNs 0.9-1.05x of fp32 here: it leaves
every convolution in fp32. Static QDQ quantizes the convolutions too.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from search.config import Int8Config
from trainables.data.datasets import DataSplit, ImageDataset

INT8_FILE = "model.int8.onnx"
# Instruction sets that give int8 matrix products their speed on x86 (ONNX Runtime's
# MLAS uses VNNI / AMX kernels; without them int8 may be no faster than fp32).
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512f", "avx2")


def cpu_int8_flags() -> dict[str, bool]:
    """Which of ``INT8_CPU_FLAGS`` this CPU has (Linux /proc/cpuinfo; all False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return {flag: flag in flags for flag in INT8_CPU_FLAGS}


def int8_speed_note(flags: dict[str, bool]) -> str | None:
    """A warning when the CPU lacks the instructions int8 kernels need to be fast."""
    if flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_int8"):
        return None
    return ("this CPU has no VNNI or AMX (flags: " + ", ".join(f for f, on in flags.items() if on) +
            "): int8 may be no faster than fp32 here; measure before serving it.")


def calibration_batches(split: DataSplit, transform, options: Int8Config) -> Iterator[np.ndarray]:
    """``options.calibration_images`` training images (a seeded sample), preprocessed as
    for inference, in batches of up to 32, decoded as the calibrator asks for them."""
    rng = random.Random(options.seed)
    samples = list(split.train)
    chosen = rng.sample(samples, min(options.calibration_images, len(samples)))
    dataset = ImageDataset(split.root, chosen, transform)
    for start in range(0, len(dataset), 32):
        yield np.stack([dataset[i][0].numpy() for i in range(start, min(start + 32, len(dataset)))])


def quantize_int8(onnx_path: Path, out_path: Path, batches: Iterable[np.ndarray], options: Int8Config,
                  input_name: str) -> None:
    """Write the static int8 QDQ model of ``onnx_path`` to ``out_path``, calibrated on ``batches``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.method]
    with tempfile.TemporaryDirectory(prefix="tunecv-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph optimisation first (BatchNorm folded into Conv), as
        # ONNX Runtime's quantization guide prescribes.
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(
            str(prepared), str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            # U8S8: uint8 activations, int8 weights. x86's VNNI multiplies u8 by s8; with
            # int8 activations (S8S8, ORT's default) resnet10t at 64 px ran no faster than
            # fp32 here (23.7 vs 23.5 ms at batch 32), with U8S8 2.4x faster (9.7 ms).
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
            # 7-bit weights: u8 x s8 products summed in pairs saturate int16 in the AVX2 and
            # AVX-512 kernels ORT picks when VNNI is not used. With full-range weights
            # resnet10t on digits lost 12 macro-F1 points (0.966 -> 0.846, argmax agreement
            # 0.861, onnxruntime 1.32); with reduce_range it lost 0.3 (0.964, agreement 0.997).
            reduce_range=True,
        )
    onnx.checker.check_model(str(out_path), full_check=True)


def int8_gate(fp32_f1: float, int8_f1: float, fp32_per_class: dict[str, float], int8_per_class: dict[str, float],
              agreement: float, options: Int8Config, flags: dict[str, bool]) -> dict[str, Any]:
    """The numbers of the int8 check and whether the int8 model ships."""
    drop_points = 100.0 * (fp32_f1 - int8_f1)
    class_drops = {name: 100.0 * (fp32_per_class[name] - int8_per_class[name]) for name in fp32_per_class}
    worst = max(class_drops, key=class_drops.get)
    shipped = drop_points <= options.max_drop
    losers = {name: round(d, 3) for name, d in sorted(class_drops.items(), key=lambda kv: -kv[1]) if d > 0}
    report = {
        "shipped": shipped, "file": INT8_FILE if shipped else None,
        "macro_f1": int8_f1, "fp32_macro_f1": fp32_f1, "macro_f1_drop_points": drop_points,
        "max_drop_points": options.max_drop, "argmax_agreement": agreement,
        "largest_class_drop": {"class": worst, "points": class_drops[worst]},
        "calibration": {"images": options.calibration_images, "method": options.method,
                        "split": "train", "seed": options.seed},
        "format": "QDQ, per-channel int8 weights, uint8 activations", "cpu_flags": flags,
    }
    if not shipped:
        report["refused"] = (f"int8 macro-F1 {int8_f1:.4f} is {drop_points:.2f} points below fp32's {fp32_f1:.4f}, "
                             f"more than max_drop {options.max_drop:g}; classes that lost (points): {losers}. "
                             "Kept fp32 only; try --int8-method entropy or percentile, or more calibration images.")
    if note := int8_speed_note(flags):
        report["speed_note"] = note
    return report
