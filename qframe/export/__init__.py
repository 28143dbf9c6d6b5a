"""Export of quantized models: ONNX with Q/DQ (``qframe.export.onnx``) and static checks of the
exported graph against TensorRT's explicit-quantization rules (``qframe.export.lint``) and the
DLA 2.0 layer restrictions on Jetson AGX Orin (``qframe.export.dla``).

Submodules import torch/onnx themselves; importing this package imports nothing heavy.
"""
