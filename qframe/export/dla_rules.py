"""DLA 2.0 (Jetson AGX Orin) layer restrictions, as data.

Source: NVIDIA TensorRT Developer Guide, "DLA Supported Layers and Restrictions" (TensorRT
8.5-10.x, the JetPack 5/6 releases; https://docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/dla-layer-restrictions.html). Ranges are inclusive ``(low, high)``. The numbers
are what the guide states for Orin; a layer the table does not name is assumed to fall back to
the GPU (TensorRT's ``allowGPUFallback``).
"""

from __future__ import annotations

SOURCE = ("NVIDIA TensorRT Developer Guide, 'DLA Supported Layers and Restrictions' "
          "(TensorRT 8.5-10.x, DLA 2.0 / Jetson AGX Orin)")

PRECISIONS = ("fp16", "int8")          # DLA computes in FP16 or INT8 only
KNOWN_PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")
MAX_LOADABLES = 16                     # loadables per DLA core at once
MAX_DIM = 8192                         # any non-batch dimension, output channels included

CONV = {
    "kernel": (1, 32),
    "stride": (1, 8),
    "padding": (0, 31),                # and each pad smaller than the kernel
    "dilation": (1, 32),
    "out_channels": (1, MAX_DIM),
}
DECONV = {
    "kernel": (1, 32),
    "stride": (1, 32),
    "out_channels": (1, MAX_DIM),
    # no padding, no groups > 1, no dilation > 1
}
POOL = {"window": (1, 8), "stride": (1, 16), "padding": (0, 7)}

ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "PRelu")
CLIP_MAX = (1, 127)                    # clipped ReLU: min 0, max in [1, 127]
ELEMENTWISE = ("Add", "Sub", "Mul", "Max", "Min")
SCALE_LAYERS = ("BatchNormalization",)  # becomes an IScaleLayer, which DLA runs
CHANNEL_AXIS = 1
RESIZE_MODES = ("nearest", "linear")   # integer scale factors only

EXPLICIT_GPU = {
    "Gather": "Gather is not a DLA layer",
    "HardSwish": "HardSwish is not a DLA activation (ReLU, Sigmoid, TanH, Clip, LeakyReLU)",
    "Gelu": "Gelu is not a DLA activation",
    "Erf": "Erf is not a DLA layer",
}
