"""TensorRT hand-off: engines for the GPU (explicit Q/DQ) and the DLA (implicit INT8 + calibration cache).

The GPU engine is built from the Q/DQ ONNX as it is (explicit quantization). The DLA path on the
JetPack TensorRT versions (8.5-10.3) takes no Q/DQ graph, so :func:`strip_qdq` turns the Q/DQ
ONNX into a plain FP32 graph (weights replaced by their dequantized values, so clipped sub-8-bit
levels survive) plus per-tensor activation scales, which :func:`write_calibration_cache` writes in
TensorRT's calibration-cache text format for ``trtexec --calib``. Where TensorRT is not installed
(this machine), :func:`write_build_script` writes the exact ``trtexec`` commands to run on the
target instead, one branch per TensorRT version family (:mod:`qframe.export.trt_plan`): the
strongly typed Q/DQ path for GPU engines on TensorRT >= 10 and for the DLA on >= 11.4.1, the
calibration-cache path for the DLA on 8.5-10.x; the same exported files serve all of them.

Sources: NVIDIA Deep-Learning-Accelerator-SW ``tools/qdq-translator`` (the same translation and
its trtexec DLA recipe), trtexec's option help (NVIDIA/TensorRT samples) and DESIGN.md.
"""

from __future__ import annotations

import logging
import numbers
import shlex
import struct
from pathlib import Path

from qframe.errors import QFrameError, first_line
from qframe.utils.io import atomic_copy, atomic_onnx_save, atomic_write_bytes, atomic_write_text, ensure_folder

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SCRIPT_NAME = "build_engines.sh"
# Ops whose output range equals their input's (max/shape ops): TensorRT's implicit INT8 needs a
# scale on each layer output, and qdq-translator fills these the same way.
SCALE_PRESERVING = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _load(model_or_path):
    import onnx
    if isinstance(model_or_path, (str, Path)):
        if not Path(model_or_path).is_file():
            raise QFrameError(f"ONNX file not found: {model_or_path}")
        return onnx.load(str(model_or_path))
    return model_or_path


def _consts(model) -> dict:
    """Constant tensors by name: initializers, Constant outputs and Identity chains over them."""
    from onnx import numpy_helper
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # the graph is topologically sorted, so one pass resolves chains
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    vals[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type == "Identity" and node.input[0] in vals:
            vals[node.output[0]] = vals[node.input[0]]
    return vals


def _qparams(node, consts):
    import numpy as np
    scale = consts.get(node.input[1])
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
    if scale is None:
        raise QFrameError(f"{node.op_type} {node.name!r} has a non-constant scale; only constant Q/DQ scales can be stripped")
    if zp.dtype != np.int8:
        raise QFrameError(f"{node.op_type} {node.name!r} is {zp.dtype}, not int8; TensorRT takes only signed int8 Q/DQ")
    return scale.astype(np.float32), zp


def _dequantize(w, scale, zp, axis: int, quantize: bool):
    """ONNX QuantizeLinear (round half to even, saturate) then DequantizeLinear, in float32."""
    import numpy as np
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis % w.ndim] = -1
    s, z = scale.reshape(shape), zp.astype(np.float32).reshape(shape if zp.ndim else [1] * w.ndim)
    q = np.clip(np.rint(w.astype(np.float32) / s) + z, -128, 127) if quantize else w.astype(np.float32)
    return ((q - z) * s).astype(np.float32)


def strip_qdq(model, *, name: str = "model") -> tuple:
    """A Q/DQ-free FP32 copy of ``model`` plus ``{tensor name: activation scale}`` for the DLA.

    Every QuantizeLinear -> DequantizeLinear pair is removed and the DQ's consumers read the Q's
    input. Weight pairs on float initializers become one float
    initializer holding the dequantized weight. Activation scales are keyed by the Q's input,
    the tensor left in the stripped graph (amax = scale * 127).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from qframe.export.qdq import dequantize_array
    model = onnx.ModelProto.FromString(_load(model).SerializeToString())  # never edit the caller's copy
    g = model.graph
    if not any(n.op_type in QDQ_OPS for n in g.node):
        raise QFrameError(f"{name} has no QuantizeLinear/DequantizeLinear nodes; the DLA calibration cache needs a "
                          "Q/DQ (quantized) ONNX, not an FP32 one")
    consts = _consts(model)
    graph_outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}  # DQ output -> tensor that replaces it
    drop, scales, new_inits = set(), {}, []
    nodes = list(g.node)  # indices, not id(): protobuf wrappers are not stable objects
    for k, node in enumerate(nodes):
        if node.op_type == "QuantizeLinear":
            dqs = [j for j, n in enumerate(nodes) if node.output[0] in n.input]
            if not dqs or any(nodes[j].op_type != "DequantizeLinear" for j in dqs):
                raise QFrameError(f"QuantizeLinear {node.name!r} is not followed only by DequantizeLinear; cannot strip it")
            scale, zp = _qparams(node, consts)
            src = node.input[0]
            drop.add(k)
            if src in consts:  # weight: fold Q -> DQ into one dequantized float initializer
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                value = _dequantize(consts[src], scale, zp, axis, quantize=True)
                target = f"{src}_dequantized"
                new_inits.append(numpy_helper.from_array(value, target))
            else:
                if scale.size != 1:
                    raise QFrameError(f"activation QuantizeLinear {node.name!r} is per-channel; a calibration cache holds one scale per tensor")
                if np.any(zp != 0):
                    raise QFrameError(f"QuantizeLinear {node.name!r} has zero point {zp.tolist()}; TensorRT int8 is symmetric (zero point 0)")
                value = float(scale.reshape(-1)[0])
                if src in scales and scales[src] != value:
                    log.warning("tensor %s is quantized with scales %g and %g; keeping the larger", src, scales[src], value)
                scales[src] = max(value, scales.get(src, 0.0))
                target = src
            for j in dqs:
                drop.add(j)
                rename[nodes[j].output[0]] = target
        elif node.op_type == "DequantizeLinear" and k not in drop:
            if node.input[0] not in consts or node.input[1] not in consts:
                raise QFrameError(f"DequantizeLinear {node.name!r} has no QuantizeLinear before it and a non-constant "
                                  "input; only Q -> DQ pairs and DQ of stored integer weights can be stripped")
            # integer weight codes stored in the file (int8, or INT4 blocks): one dequantized float initializer
            zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            attrs = {a.name: a.i for a in node.attribute}
            value = dequantize_array(consts[node.input[0]], consts[node.input[1]], zp, attrs.get("axis", 1),
                                     attrs.get("block_size", 0))
            target = f"{node.input[0]}_dequantized"
            new_inits.append(numpy_helper.from_array(value, target))
            drop.add(k)
            rename[node.output[0]] = target
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for k, n in enumerate(nodes) if k not in drop]
    for n in kept:
        for i, inp in enumerate(n.input):
            if inp in rename:
                n.input[i] = rename[inp]
    for dq_out, target in rename.items():
        if dq_out in graph_outputs:  # keep the graph's output name: bridge it with an Identity
            kept.append(helper.make_node("Identity", [target], [dq_out], name=f"{dq_out}_identity"))
    del g.node[:], g.value_info[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input} | graph_outputs
    for t in list(g.initializer):  # drop what only fed Q/DQ (scales, zero points, raw weights)
        if t.name not in used:
            g.initializer.remove(t)
    onnx.checker.check_model(model)
    log.info("stripped %d Q/DQ nodes; %d activation scales", len(drop), len(scales))
    return model, scales


def propagate_scales(model, scales: dict, ops=SCALE_PRESERVING) -> dict:
    """``scales`` extended both ways across range-preserving single-input ops (``ops``).

    Implicit INT8 wants a scale on each layer output (e.g. Conv+ReLU before the MaxPool whose output
    the Q/DQ graph quantized); a layer without one runs FP16. ``strip_qdq`` covers Q inputs only."""
    out = dict(scales)
    nodes = [n for n in model.graph.node if n.op_type in ops and n.input and n.output]
    for _ in range(len(nodes) + 1):
        changed = False
        for n in nodes:
            src, dst = n.input[0], n.output[0]
            if src in out and dst not in out:
                out[dst], changed = out[src], True
            elif dst in out and src not in out:
                out[src], changed = out[dst], True
        if not changed:
            break
    return out


def write_calibration_cache(scales: dict, path, version_tag: str = "TRT-8601-EntropyCalibration2") -> Path:
    """Write ``scales`` in TensorRT's calibration-cache text format; returns the path.

    Line 1 is ``version_tag``; then ``name: hex`` per tensor, hex being the IEEE-754 float32 bits
    of the scale (amax / 127) written as one 8-digit big-endian hex number, as TensorRT's
    calibrators and NVIDIA's qdq-translator write it.
    """
    text = _calibration_text(scales, version_tag)  # checked before anything is written
    path = Path(path)
    atomic_write_text(text, path)
    return path


def _calibration_text(scales: dict, version_tag: str) -> str:
    lines = [version_tag]
    for name, scale in scales.items():
        if not scale > 0 or "\n" in name:
            raise QFrameError(f"tensor {name!r} has scale {scale}; a calibration cache needs positive scales, one-line names")
        lines.append(f"{name}: {struct.unpack('>I', struct.pack('>f', scale))[0]:08x}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(path) -> tuple[str, dict]:
    """``(header, {tensor name: scale})`` read from a TensorRT calibration-cache text file."""
    path = Path(path)
    if not path.is_file():
        raise QFrameError(f"calibration cache not found: {path}")
    header, *lines = path.read_text().splitlines()
    pairs = [line.rpartition(": ")[::2] for line in lines if line]  # names may hold ':', the hex never
    return header, {n: struct.unpack(">f", bytes.fromhex(b.strip().zfill(8)))[0] for n, b in pairs}


def _input_shape_args(model, input_shape) -> list[str]:
    """``--shapes=...`` where the ONNX input (of ``model``, a ModelProto or a path) has a symbolic dim (the DLA
    builds static shapes only)."""
    import onnx
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    args = []
    for inp in (i for i in graph.input if i.name not in inits):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
        if all(d > 0 for d in dims):
            continue
        if input_shape is None:
            example = ", ".join(str(d) if d > 0 else "1" for d in dims)
            raise QFrameError(f"ONNX input {inp.name!r} has dynamic dims {dims}; pass input_shape=({example}) (the "
                              "shape the engines are built for)")
        given = tuple(input_shape)
        if len(given) != len(dims) or any(d > 0 and g != d for g, d in zip(given, dims)) or \
                not all(isinstance(g, numbers.Integral) and g > 0 for g in given):
            fixed = "x".join(str(d) if d > 0 else "N" for d in dims)
            raise QFrameError(f"input_shape={given} does not fit ONNX input {inp.name!r} of shape {fixed}; valid: "
                              f"positive sizes that keep its fixed dims, e.g. ({', '.join(str(d) if d > 0 else '1' for d in dims)})")
        args.append(f"--shapes={inp.name}:{'x'.join(str(int(g)) for g in given)}")
    return args


def write_build_script(run_dir, *, int8_onnx, fp32_onnx=None, dla_core: int = 0, gpu_fallback: bool = True,
                       workspace_mib: int = 1024, input_shape=None, iterations: int = 1000, duration_s: int = 10,
                       version_tag: str = "TRT-8601-EntropyCalibration2", propagate: bool = True) -> Path:
    """Write ``run_dir/build_engines.sh`` with the trtexec commands, and the files it reads.

    Next to it: ``model_int8.onnx`` (the Q/DQ graph: GPU engines, and DLA engines on TensorRT >=
    11.4.1), ``model_fp32.onnx`` (baseline, when given), ``model_int8_noqdq.onnx`` and
    ``model_int8_noqdq.calib`` (DLA INT8 on TensorRT 8.5-10.x). The script asks trtexec for its
    version on the device and takes the branch of :func:`qframe.export.trt_plan.engine_builds` for
    it (``TRT_VERSION=10.3.0`` overrides). Every path in the script is relative to its folder, so
    the folder can be copied to a Jetson as is.

    Bad input (a ``run_dir`` that is a file, a missing or non-ONNX file, a graph the DLA's calibration
    path cannot take, an ``input_shape`` missing or not fitting the graph) is refused in one line
    before anything is written; a write that fails takes back the files and folders this call made.
    """
    from qframe.export.trt_plan import FAMILIES, build_args, engine_builds, time_args

    # Everything is checked (the numbers, the folder, both graphs, the Q/DQ stripping, the shape) before a file is written.
    for name, value, least in (("dla_core", dla_core, 0), ("workspace_mib", workspace_mib, 1),
                               ("iterations", iterations, 1), ("duration_s", duration_s, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise QFrameError(f"{name}={value!r} is invalid; valid: an integer >= {least}")
    run_dir = Path(run_dir)
    if blocker := next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None):
        raise QFrameError(f"run_dir '{run_dir}': '{blocker}' is a file, not a folder; valid: a folder (new or existing)")
    int8_onnx = Path(int8_onnx)
    model = _onnx_file(int8_onnx, "int8_onnx")
    if fp32_onnx is not None:
        _onnx_file(fp32_onnx, "fp32_onnx", load_external_data=False)
    stripped, scales = strip_qdq(model, name=str(int8_onnx))
    calibration = _calibration_text(propagate_scales(stripped, scales) if propagate else scales, version_tag)
    shapes = _input_shape_args(model, input_shape)
    files = {"int8": run_dir / "model_int8.onnx", "fp32": run_dir / "model_fp32.onnx",
             "dla": run_dir / "model_int8_noqdq.onnx", "calib": run_dir / "model_int8_noqdq.calib"}
    versions = {"trt8": "8.6.1", "trt10": "10.3.0", "trt11": "11.0.0", "trt11_dla": "11.4.1"}  # one of each family
    lines = f"""#!/usr/bin/env bash
# Written by qframe.export.tensorrt: TensorRT engines and timings for this model. Run it on the target
# (Jetson AGX Orin for the DLA lines; DLA=0 skips them on a desktop GPU). TRTEXEC defaults to trtexec
# on PATH; JetPack has it at /usr/src/tensorrt/bin/trtexec. The TensorRT version (trtexec's banner, or
# TRT_VERSION=10.3.0 to override) picks the build path:
#   8.5-8.6      GPU INT8 from the Q/DQ graph with --int8 --fp16; DLA INT8 from the calibration cache
#   10.x         GPU INT8 strongly typed (--stronglyTyped); DLA INT8 from the calibration cache
#   11.0-11.4.0  all strongly typed (no --int8/--fp16/--calib); FP16 from an AutoCast FP16 ONNX; no DLA
#   >= 11.4.1    as 11.x, and DLA INT8 from the same Q/DQ graph, DLA FP16 from AutoCast --target_dla
# Cache header: {version_tag}.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-trtexec}}" DLA="${{DLA:-1}}" ITERATIONS="${{ITERATIONS:-{iterations}}}" DURATION="${{DURATION:-{duration_s}}}"
mkdir -p engines logs
trt_code() {{  # 8502 / 100300 / 10.3.0 / 8.5.2.2 -> MAJOR*10000 + MINOR*100 + PATCH
  case "$1" in
    *.*) echo "$1" | awk -F. '{{print $1 * 10000 + $2 * 100 + $3}}' ;;
    [0-9][0-9][0-9][0-9]) echo $(( ${{1:0:1}} * 10000 + ${{1:1:1}} * 100 + 10#${{1:2:2}} )) ;;
    [0-9][0-9][0-9][0-9][0-9][0-9]) echo $(( 10#$1 )) ;;
    *) echo 0 ;;
  esac
}}
TRT_VERSION="${{TRT_VERSION:-$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p' | head -n 1)}}"
if [ -z "$TRT_VERSION" ]; then
  TRT_VERSION="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
fi
CODE="$(trt_code "$TRT_VERSION")"
if [ "$CODE" -lt 80500 ]; then echo "TensorRT version '$TRT_VERSION' unknown or older than 8.5; set TRT_VERSION" >&2; exit 2; fi
if [ "$CODE" -ge 110401 ]; then FAMILY=trt11_dla; elif [ "$CODE" -ge 110000 ]; then FAMILY=trt11
elif [ "$CODE" -ge 100000 ]; then FAMILY=trt10; else FAMILY=trt8; fi
echo "TensorRT $TRT_VERSION: build path $FAMILY"
have_autocast() {{ python3 -c 'import modelopt.onnx.autocast' >/dev/null 2>&1; }}
case "$FAMILY" in""".splitlines()
    q = shlex.quote
    for fam in FAMILIES:
        lines.append(f"{fam})")
        builds = engine_builds(versions[fam], dla_core=dla_core, gpu_fallback=gpu_fallback,
                               fp32_onnx=fp32_onnx is not None)
        if fam == "trt11":
            lines.append('  if [ "$DLA" = 1 ]; then echo "TensorRT $TRT_VERSION has no DLA on Jetson (back in 11.4.1 '
                         'with JetPack >= 7.2.2): DLA engines skipped"; fi')
        for b in builds:
            build = " ".join(['"$TRTEXEC"', *map(q, build_args(b, shapes=shapes, workspace_mib=workspace_mib))])
            run = " ".join(['"$TRTEXEC"', *map(q, time_args(b, shapes=shapes, iterations="$ITERATIONS",
                                                             duration="$DURATION"))]).replace(
                "'--iterations=$ITERATIONS'", '--iterations="$ITERATIONS"').replace(
                "'--duration=$DURATION'", '--duration="$DURATION"')
            body = [f"{build} 2>&1 | tee logs/{b.engine}.build.log", f"{run} 2>&1 | tee logs/{b.engine}.time.log"]
            if b.prepare:
                cond = f"[ -f {b.onnx} ] || {{ have_autocast && {b.prepare}; }}"
                body = [f"if {cond}; then", *("  " + x for x in body),
                        f'else echo "{b.engine} skipped: {b.skip_reason}"; fi']
            if b.dla:
                body = ['if [ "$DLA" = 1 ]; then', *("  " + x for x in body), "fi"]
            lines += [f"  # {b.engine}: {b.device} {b.precision}, {b.path}", *("  " + x for x in body)]
        lines.append("  ;;")
    lines.append("esac")
    script = run_dir / SCRIPT_NAME
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # folders this call creates, deepest first
    written: list[Path] = []
    try:
        ensure_folder(script)
        if int8_onnx.resolve() != files["int8"].resolve():
            written.append(atomic_copy(int8_onnx, files["int8"]))
        written.append(atomic_onnx_save(stripped, files["dla"]))
        written.append(atomic_write_text(calibration, files["calib"]))
        if fp32_onnx is not None and Path(fp32_onnx).resolve() != files["fp32"].resolve():
            written.append(atomic_copy(fp32_onnx, files["fp32"]))
        written.append(atomic_write_text("\n".join(lines) + "\n", script, executable=True))
    except BaseException:  # a full disk, a killed run: leave no partial set of files behind
        for path in written:
            path.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    log.info("wrote %s", script)
    return script


def _onnx_file(path, what: str, load_external_data: bool = True):
    """The ONNX model at ``path``, checked; one line naming ``what`` for a missing, unreadable or invalid file."""
    import onnx
    path = Path(path)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "not found"
        raise QFrameError(f"ONNX file {why}: {what}={str(path)!r}; valid: the path of an .onnx file (export_onnx's)")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
        onnx.checker.check_model(str(path))  # by path: external data and graphs over 2 GiB too
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, missing external data
        raise QFrameError(f"{what}={str(path)!r} is not a valid ONNX model ({first_line(exc)}); valid: an .onnx "
                          "file as export_onnx writes it") from None
    return model


def prepare_tensorrt(run_dir, int8_onnx_path, fp32_onnx_path=None, **opts) -> dict:
    """Strip, write the calibration cache and the build script; returns their paths and the message."""
    script = write_build_script(run_dir, int8_onnx=int8_onnx_path, fp32_onnx=fp32_onnx_path, **opts)
    d, (ok, reason) = script.parent, tensorrt_available()
    return {"script": script, "int8_onnx": d / "model_int8.onnx", "dla_onnx": d / "model_int8_noqdq.onnx",
            "calibration_cache": d / "model_int8_noqdq.calib",
            "fp32_onnx": d / "model_fp32.onnx" if fp32_onnx_path is not None else None,
            "tensorrt": ok, "reason": reason,
            "message": (f"TensorRT is not installed here: wrote {SCRIPT_NAME} with the trtexec commands for the GPU "
                        f"and DLA engines to {d}") if not ok else f"wrote {SCRIPT_NAME} to {d}; {reason}"}


def tensorrt_available() -> tuple[bool, str]:
    """``(True, version)`` when ``import tensorrt`` works, else ``(False, why)``."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"tensorrt is not installed ({type(exc).__name__}: {exc})"
    return True, f"tensorrt {trt.__version__}"


def build_engine(onnx_path, engine_path, *, int8: bool = True, fp16: bool = True, calibration_cache=None,
                 dla_core: int | None = None, gpu_fallback: bool = True, strongly_typed: bool | None = None,
                 workspace_mib: int = 1024, input_shape: tuple[int, ...] | None = None) -> Path:
    """Build and save a TensorRT engine with the Python API (only where ``import tensorrt`` works).

    ``strongly_typed=None`` (the default) follows :mod:`qframe.export.trt_plan`: strongly typed on
    TensorRT >= 10 unless a ``calibration_cache`` asks for implicit INT8 (the DLA on 8.5-10.x);
    ``int8``/``fp16`` then only apply to weakly typed builds. TensorRT >= 11 has no weak typing and
    no calibrators: there a ``calibration_cache`` is refused with the path that replaces it.
    An ONNX input with a symbolic (batch) axis is built for ``input_shape`` (an optimization
    profile with that one shape; the DLA builds static shapes only).
    """
    if not (avail := tensorrt_available())[0]:
        raise QFrameError(f"{avail[1]}; run {SCRIPT_NAME} from prepare_tensorrt() on the target instead")
    import tensorrt as trt

    from qframe.export.trt_plan import STRONGLY_TYPED, WEAK_TYPING_REMOVED, parse_version
    version = parse_version(trt.__version__)
    if calibration_cache is not None and version >= WEAK_TYPING_REMOVED:
        raise QFrameError(f"TensorRT {trt.__version__} removed implicit INT8 and calibrators; build the DLA engine "
                          "from the Q/DQ ONNX (model_int8.onnx) instead of the calibration cache (TensorRT >= 11.4.1)")
    if strongly_typed is None:
        strongly_typed = version >= STRONGLY_TYPED and calibration_cache is None
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise QFrameError(f"ONNX file not found: {onnx_path}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag_enum, flags = trt.NetworkDefinitionCreationFlag, 0
    if hasattr(flag_enum, "EXPLICIT_BATCH"):  # required before 10.0, ignored after
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    strongly_typed = strongly_typed and hasattr(flag_enum, "STRONGLY_TYPED")
    if strongly_typed:  # precisions come from the Q/DQ graph; builder precision flags are refused
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QFrameError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        if input_shape is None:
            raise QFrameError(f"ONNX input {dynamic[0].name!r} has dynamic dims {tuple(dynamic[0].shape)}; pass "
                              "input_shape=(N, C, H, W)")
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            profile.set_shape(tensor.name, input_shape, input_shape, input_shape)
        config.add_optimization_profile(profile)
    for on, flag in ((int8, "INT8"), (fp16, "FP16")):  # the flags are gone from TensorRT 11
        if on and not strongly_typed and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if calibration_cache is not None:
        cache = Path(calibration_cache).read_bytes()

        class _CacheCalibrator(trt.IInt8EntropyCalibrator2):  # serves the cache; never asks for data
            get_batch_size = staticmethod(lambda: 1)
            get_batch = staticmethod(lambda names: None)
            read_calibration_cache = staticmethod(lambda: cache)
            write_calibration_cache = staticmethod(lambda data: None)

        config.int8_calibrator = _CacheCalibrator()
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        if gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QFrameError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(bytes(serialized), engine_path)
    return engine_path


def torch_tensorrt_available() -> tuple[bool, str]:
    """``(True, version)`` when ``import torch_tensorrt`` works, else ``(False, why)``."""
    try:
        import torch_tensorrt
    except Exception as exc:  # ImportError, or a CUDA-less torch making its import fail
        return False, f"torch_tensorrt is not installed ({type(exc).__name__}: {exc})"
    return True, f"torch_tensorrt {torch_tensorrt.__version__}"


def compile_torch_tensorrt(model, example, *, fp16: bool = True, **settings):
    """The model compiled by Torch-TensorRT (dynamo frontend), where ``import torch_tensorrt`` works.

    The model runs in export mode (:func:`qframe.export.onnx.export_mode`): its quantizers are
    ``aten.fake_quantize_per_{tensor,channel}_affine`` ops, which Torch-TensorRT turns into
    TensorRT Q/DQ layers where it has converters for them and otherwise leaves to PyTorch (see its
    partitioning log). The ONNX route (:func:`prepare_tensorrt`, trtexec) is the one qframe checks
    with its lint and DLA report; this one suits a desktop GPU run inside Python. ``settings`` go
    to ``torch_tensorrt.compile`` (e.g. ``min_block_size``).
    """
    if not (avail := torch_tensorrt_available())[0]:
        raise QFrameError(f"{avail[1]}; use prepare_tensorrt() and its build_engines.sh (trtexec) instead")

    import torch
    import torch_tensorrt

    from qframe.export.onnx import export_mode
    from qframe.utils.modules import copy_model
    from qframe.methods.qat import fold_qat
    from qframe.quant.modules import bake_int32_biases

    model = bake_int32_biases(fold_qat(copy_model(model).eval()))
    precisions = {torch.float32, torch.float16} if fp16 else {torch.float32}
    with export_mode(model), torch.no_grad():
        return torch_tensorrt.compile(model, ir="dynamo", inputs=[example], enabled_precisions=precisions, **settings)
