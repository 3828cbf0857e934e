"""Building and running a TensorRT engine from an exported ONNX model (GPU machines only).

This module owns the TensorRT API calls: whether TensorRT can run here, building an
engine with a dynamic-batch profile (fp16 where the API offers it), and running it over
a loader. It knows nothing of checkpoints or metrics: ``search/export/onnx.py`` compares the
logits it returns against PyTorch. The ``tensorrt`` package is imported only here, and
only when called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TensorRTError(RuntimeError):
    """TensorRT could not parse, build or run the model."""


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run on this machine, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"the tensorrt package does not import ({err})"
    return None


def build_engine(onnx_path: Path, input_name: str, image_size: int, max_batch: int):
    """Parse the ONNX and build an engine for batch 1..max_batch; fp16 where the API has it."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch, the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT {trt.__version__} cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    # TensorRT 11 removed the FP16 flag (precision must then live in the graph); fp16
    # kernels need compute capability 5.3 or newer.
    fp16 = hasattr(trt.BuilderFlag, "FP16") and torch.cuda.get_device_capability() >= (5, 3)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shape = (3, image_size, image_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *shape), (max_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT {trt.__version__} could not build an engine; see its log.")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    return engine, ("fp16" if fp16 else "fp32"), trt.__version__


def run_tensorrt(
    onnx_path: Path, loader, input_name: str, output_name: str, *, num_classes: int, image_size: int
) -> tuple[np.ndarray, dict]:
    """Build an engine and run it over every batch of ``loader``.

    Returns:
        (logits [N, num_classes], {"version", "precision", "device"}).
    """
    engine, precision, version = build_engine(onnx_path, input_name, image_size, loader.batch_size)
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    outputs = []
    with torch.cuda.stream(stream):  # copies and the engine share one stream
        for x, _ in loader:
            x = x.cuda().contiguous()
            out = torch.empty((x.shape[0], num_classes), device="cuda")
            context.set_input_shape(input_name, tuple(x.shape))
            context.set_tensor_address(input_name, x.data_ptr())
            context.set_tensor_address(output_name, out.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise TensorRTError("TensorRT failed to run the engine on a validation batch.")
            outputs.append(out.cpu().numpy())  # .cpu() waits for the stream
    info = {"version": version, "precision": precision, "device": torch.cuda.get_device_name()}
    return np.concatenate(outputs), info
