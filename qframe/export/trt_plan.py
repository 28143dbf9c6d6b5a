"""Which TensorRT engines to build from qframe's exported files, and how, for each TensorRT version.

One exported folder serves every version: ``model_int8.onnx`` (the Q/DQ graph), ``model_fp32.onnx``
and, for the older DLA path, ``model_int8_noqdq.onnx`` with ``model_int8_noqdq.calib``. What differs
is the build (facts from NVIDIA's TensorRT release notes and migration guides):

- TensorRT 8.5-8.6 (JetPack 5): the Q/DQ graph builds with ``--int8 --fp16`` (explicit quantization,
  weakly typed); the DLA takes no Q/DQ graph, so DLA INT8 is implicit quantization from the
  calibration cache (``--calib``).
- TensorRT 10.x (JetPack 6): the GPU INT8 engine is strongly typed (``--stronglyTyped``): the Q/DQ
  graph alone sets each layer's precision. Implicit quantization is deprecated since 10.1 but still
  works, and it is still the DLA's only INT8 path there.
- TensorRT 11.0-11.4.0: weak typing is gone (``--int8``, ``--fp16``, ``--calib`` and the calibrators
  were removed; every network is strongly typed, ``--stronglyTyped`` is no longer needed). FP16 needs
  an FP16 ONNX (ModelOpt AutoCast); there is no DLA on Jetson.
- TensorRT >= 11.4.1 (JetPack >= 7.2.2, AGX Orin): the DLA is back, strongly typed: DLA INT8 builds
  from the same Q/DQ graph as the GPU, DLA FP16 from an FP16 ONNX made with AutoCast's ``--target_dla``.
  GPU fallback (``--allowGPUFallback``) works as in 10.x.

:func:`engine_builds` returns that plan as data; :mod:`qframe.export.tensorrt` renders it into
``build_engines.sh`` (one branch per version family, chosen on the device) and ``qframe.deploy``
runs it through trtexec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qframe.errors import QFrameError

STRONGLY_TYPED = (10, 0, 0)  # trtexec --stronglyTyped exists
WEAK_TYPING_REMOVED = (11, 0, 0)  # --int8 / --fp16 / --calib and the calibrators removed
DLA_STRONGLY_TYPED = (11, 4, 1)  # DLA back on Jetson AGX Orin (JetPack >= 7.2.2), Q/DQ graphs
FAMILIES = ("trt8", "trt10", "trt11", "trt11_dla")
AUTOCAST = "python3 -m modelopt.onnx.autocast"


def parse_version(text) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a TensorRT version as trtexec or ``tensorrt.__version__`` write it.

    Takes ``"10.3.0"``, ``"8.5.2.2"``, trtexec's banner number (``8502`` = 8.5.2, ``100300`` = 10.3.0,
    ``110401`` = 11.4.1) or a whole banner line (``[TensorRT v100300]``).
    """
    s = str(text).strip()
    if m := re.search(r"TensorRT v(\d+)", s):
        s = m.group(1)
    if re.fullmatch(r"\d+(\.\d+){1,3}", s):
        parts = [int(p) for p in s.split(".")] + [0]
        return parts[0], parts[1], parts[2]
    if re.fullmatch(r"\d{4}", s):  # 8.x: one digit each for major and minor, two for the patch
        return int(s[0]), int(s[1]), int(s[2:])
    if re.fullmatch(r"\d{6}", s):  # 10.x and later: two digits each
        return int(s[:2]), int(s[2:4]), int(s[4:])
    raise QFrameError(f"TensorRT version {text!r} is not understood; valid: '10.3.0', '8.5.2.2', 8502, 100300 or "
                      "a trtexec banner '[TensorRT v100300]'")


def version_code(version) -> int:
    """``major * 10000 + minor * 100 + patch``: the number ``build_engines.sh`` compares."""
    major, minor, patch = version if isinstance(version, tuple) else parse_version(version)
    return major * 10000 + minor * 100 + patch


def family(version) -> str:
    """The build path of a TensorRT version: one of :data:`FAMILIES`."""
    v = version if isinstance(version, tuple) else parse_version(version)
    if v < (8, 5, 0):
        raise QFrameError(f"TensorRT {'.'.join(map(str, v))} is too old; qframe's engines need TensorRT >= 8.5 "
                          "(JetPack 5 or later)")
    if v >= DLA_STRONGLY_TYPED:
        return "trt11_dla"
    if v >= WEAK_TYPING_REMOVED:
        return "trt11"
    return "trt10" if v >= STRONGLY_TYPED else "trt8"


@dataclass(frozen=True)
class EngineBuild:
    """One engine: built by trtexec from ``onnx`` with ``flags``, then timed.

    ``prepare`` is a shell command that writes ``onnx`` where the export did not ship it (an FP16
    ONNX made by ModelOpt AutoCast for strongly typed FP16); without it, ``fallback`` is built
    instead, or, when ``fallback`` is None, the engine is skipped with ``skip_reason``.
    """

    engine: str  # gpu_int8, gpu_fp16, gpu_fp32, dla_int8, dla_fp16
    onnx: str
    flags: tuple[str, ...]
    path: str  # how precision is set: "strongly typed Q/DQ", "calibration cache", ...
    dla: bool = False
    prepare: str | None = None
    fallback: str | None = None
    skip_reason: str = ""
    load_flags: tuple[str, ...] = field(default=())  # what --loadEngine needs again (the DLA core)

    @property
    def device(self) -> str:
        return "DLA" if self.dla else "GPU"

    @property
    def precision(self) -> str:
        return self.engine.split("_", 1)[1]


def _autocast(src: str, dst: str, dla: bool) -> str:
    target = " --target_dla" if dla else ""
    return (f"{AUTOCAST} --onnx_path={src} --output_path={dst} --low_precision_type=fp16 --keep_io_types"
            f"{target}")


def engine_builds(version, *, dla_core: int = 0, gpu_fallback: bool = True, fp32_onnx: bool = True,
                  dla: bool = True) -> list[EngineBuild]:
    """The engines to build for TensorRT ``version`` (see the module docstring), GPU first.

    ``fp32_onnx``: the export shipped ``model_fp32.onnx`` (else the float baselines build from the
    stripped graph, the float model with the quantized weights). ``dla``: add the DLA engines where
    the version has a DLA path.
    """
    fam = family(version)
    base = "model_fp32.onnx" if fp32_onnx else "model_int8_noqdq.onnx"
    dev = (f"--useDLACore={dla_core}",)
    dla_flags = dev + (("--allowGPUFallback",) if gpu_fallback else ())
    builds = []
    if fam == "trt8":
        builds.append(EngineBuild("gpu_int8", "model_int8.onnx", ("--int8", "--fp16"),
                                  "explicit Q/DQ, weakly typed (--int8 --fp16)"))
    elif fam == "trt10":
        builds.append(EngineBuild("gpu_int8", "model_int8.onnx", ("--stronglyTyped",), "strongly typed Q/DQ"))
    else:
        builds.append(EngineBuild("gpu_int8", "model_int8.onnx", (), "strongly typed Q/DQ (always on)"))
    if fam in ("trt8", "trt10"):
        builds += [EngineBuild("gpu_fp16", base, ("--fp16",), "weakly typed FP16 (--fp16)"),
                   EngineBuild("gpu_fp32", base, (), "FP32")]
    else:
        builds += [EngineBuild("gpu_fp16", "model_fp16.onnx", (), "strongly typed FP16 ONNX (AutoCast)",
                               prepare=_autocast(base, "model_fp16.onnx", dla=False),
                               skip_reason="TensorRT >= 11 builds FP16 only from an FP16 ONNX; install ModelOpt "
                                           "(nvidia-modelopt) for AutoCast or provide model_fp16.onnx"),
                   EngineBuild("gpu_fp32", base, (), "FP32")]
    if not dla:
        return builds
    if fam in ("trt8", "trt10"):
        builds += [EngineBuild("dla_int8", "model_int8_noqdq.onnx",
                               dla_flags + ("--int8", "--fp16", "--calib=model_int8_noqdq.calib"),
                               "implicit INT8, calibration cache", dla=True, load_flags=dev),
                   EngineBuild("dla_fp16", base, dla_flags + ("--fp16",), "weakly typed FP16 (--fp16)", dla=True,
                               load_flags=dev)]
    elif fam == "trt11_dla":
        builds += [EngineBuild("dla_int8", "model_int8.onnx", dla_flags, "strongly typed Q/DQ", dla=True,
                               load_flags=dev),
                   EngineBuild("dla_fp16", "model_fp16_dla.onnx", dla_flags, "strongly typed FP16 ONNX "
                               "(AutoCast --target_dla)", dla=True, load_flags=dev,
                               prepare=_autocast(base, "model_fp16_dla.onnx", dla=True),
                               skip_reason="TensorRT >= 11 builds DLA FP16 only from an FP16 ONNX; install ModelOpt "
                                           "(nvidia-modelopt) for AutoCast or provide model_fp16_dla.onnx")]
    return builds


def dla_unavailable_reason(version) -> str:
    """Why ``version`` has no DLA path ("" when it has one)."""
    if family(version) != "trt11":
        return ""
    return (f"TensorRT {'.'.join(map(str, version if isinstance(version, tuple) else parse_version(version)))} has "
            "no DLA on Jetson (removed in 11.0, back in 11.4.1 with JetPack >= 7.2.2); DLA engines skipped")


def build_args(b: EngineBuild, *, shapes: list[str], workspace_mib: int = 1024, onnx: str | None = None) -> list[str]:
    """trtexec arguments (after the program) that build ``b`` into ``engines/<engine>.engine``."""
    return [f"--onnx={onnx or b.onnx}", f"--saveEngine=engines/{b.engine}.engine", *b.flags, *shapes,
            f"--memPoolSize=workspace:{workspace_mib}", "--profilingVerbosity=detailed",
            f"--exportLayerInfo=logs/{b.engine}.layers.json", "--skipInference"]


def time_args(b: EngineBuild, *, shapes: list[str], iterations="1000", duration="10", warmup_ms: int = 500) -> list[str]:
    """trtexec arguments that load ``engines/<engine>.engine`` and time it."""
    return [f"--loadEngine=engines/{b.engine}.engine", *b.load_flags, *shapes, f"--iterations={iterations}",
            f"--duration={duration}", f"--warmUp={warmup_ms}", f"--exportTimes=logs/{b.engine}.times.json"]
