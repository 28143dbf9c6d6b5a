"""Running a TensorRT engine from Python on test images (TensorRT >= 8.5 tensor API, CUDA memory from torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from qframe.errors import QFrameError


def tensorrt_infer(engine_path: Path, build, folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from images ``[N, C, H, W]`` (float32) to logits, running ``engine_path`` one image at a
    time (the engines are built for batch 1; the DLA builds static shapes only). ``build`` is the
    :class:`qframe.export.trt_plan.EngineBuild` it came from (its DLA core). Needs the ``tensorrt``
    Python package (JetPack: python3-libnvinfer) and a CUDA build of torch for device memory."""
    core = int(next(f for f in build.load_flags if f.startswith("--useDLACore=")).split("=")[1]) if build.dla else None
    run, names = engine_outputs(engine_path, dla_core=core)
    return lambda images: run(images)[names[0]]


def engine_outputs(engine_path: Path, dla_core: int | None = None):
    """``(run, output names)``: ``run(images)`` -> ``{output name: array over all images}`` for the engine at
    ``engine_path``, one image at a time (see :func:`tensorrt_infer`)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install raising at import
        raise QFrameError(f"the tensorrt Python package is not importable ({type(exc).__name__}); accuracy needs "
                          "TensorRT's Python runtime (JetPack: sudo apt install python3-libnvinfer)") from None
    import torch

    if not torch.cuda.is_available():
        raise QFrameError("torch has no CUDA here; running the engine needs a CUDA build of torch for device memory")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if dla_core is not None:
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise QFrameError(f"TensorRT could not load {engine_path}; was it built by another TensorRT version?")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    if len(inputs) != 1 or not outputs:
        raise QFrameError(f"{engine_path} has inputs {inputs} and outputs {outputs}; expected one image input")
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        stream = torch.cuda.current_stream()
        out: dict[str, list] = {n: [] for n in outputs}
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)).cuda()
            x = x.to(dtypes.get(engine.get_tensor_dtype(inputs[0]), torch.float32))
            context.set_input_shape(inputs[0], tuple(x.shape))
            context.set_tensor_address(inputs[0], x.data_ptr())
            buffers = {}
            for name in outputs:
                shape = tuple(context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=dtypes.get(engine.get_tensor_dtype(name), torch.float32),
                                            device="cuda")
                context.set_tensor_address(name, buffers[name].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise QFrameError(f"TensorRT failed to run {engine_path}")
            stream.synchronize()
            for name in outputs:
                out[name].append(buffers[name].float().cpu().numpy())
        return {n: np.concatenate(v) for n, v in out.items()}

    return run, outputs
