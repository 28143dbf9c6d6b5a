"""On the device: build a run's TensorRT engines, check their accuracy, time them, measure their energy.

    python -m qframe.deploy RUN_DIR [--no-dla] [--duration 10] [--idle-seconds 3]

Run it on the Jetson or the desktop where TensorRT is, with the run directory (or its ``tensorrt/``
folder) copied there. For each engine of :func:`qframe.export.trt_plan.engine_builds` for the
TensorRT found (GPU INT8/FP16/FP32; DLA INT8/FP16 with GPU fallback): trtexec builds it, the
TensorRT Python runtime runs the test images exported with the run (``tensorrt/test_set.npz``) for
accuracy and agreement with the PyTorch model, trtexec times it while qframe's energy meter
(INA3221 on a Jetson, NVML on a desktop GPU) reads the power, and the rows go into the run's
``metrics.json`` and report (``deploy.md`` / ``deploy.json`` beside them).

Importing this package imports nothing heavy; :func:`qframe.deploy.engines.deploy` is the verb.
"""
