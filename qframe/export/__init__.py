"""Export of quantized models: ONNX in qframe's standard Q/DQ form, the one TensorRT and onnxruntime
both take (``qframe.export.onnx``, the graph rewrite in ``qframe.export.qdq``), onnxruntime sessions,
parity and timing (``qframe.export.ort``), static checks of the exported graph against TensorRT's
explicit-quantization rules (``qframe.export.lint``) and the DLA 2.0 layer restrictions on Jetson
AGX Orin (``qframe.export.dla``), the TensorRT hand-off (``qframe.export.tensorrt``) and the
export stage of a run (``qframe.export.stage``).

Submodules import torch/onnx themselves; importing this package imports nothing heavy.
"""
