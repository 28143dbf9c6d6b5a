"""Export of quantized models: ONNX with Q/DQ in the form TensorRT takes (``qframe.export.onnx``),
its rewrite for onnxruntime's integer CPU kernels (``qframe.export.ort_form``, built on the graph
editing in ``qframe.export.qdq``), static checks of the exported graph against TensorRT's
explicit-quantization rules (``qframe.export.lint``) and the DLA 2.0 layer restrictions on Jetson
AGX Orin (``qframe.export.dla``), the TensorRT hand-off (``qframe.export.tensorrt``) and the
export stage of a run (``qframe.export.stage``).

Submodules import torch/onnx themselves; importing this package imports nothing heavy.
"""
