"""``deploy``: the engines of a run built, checked, timed and metered on the device; rows for its report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from qframe.errors import QFrameError

log = logging.getLogger(__name__)

NO_TENSORRT = ("TensorRT is not available here (no trtexec: $TRTEXEC, PATH or /usr/src/tensorrt/bin/trtexec); run "
               "python -m qframe.deploy on the Jetson or GPU machine where TensorRT is installed")
DEPLOY_COLUMNS = [("engine", "engine"), ("precision", "precision"), ("backend", "backend/device"),
                  ("accuracy", "test acc %"), ("agreement", "agrees with PyTorch %"), ("latency_ms", "latency ms"),
                  ("latency_p90_ms", "p90 ms"), ("throughput", "images/s"), ("watts", "watts"),
                  ("joules_per_image", "J/image"), ("size_kib", "engine KiB")]


def _folders(run_dir: Path) -> tuple[Path, Path | None]:
    """(the folder with build_engines.sh's files, the run directory with metrics.json or None)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QFrameError(f"run directory {str(run_dir)!r} does not exist; give a run directory of python -m qframe "
                          "(or its tensorrt/ folder)")
    folder = run_dir / "tensorrt" if (run_dir / "tensorrt").is_dir() else run_dir
    if not (folder / "model_int8.onnx").is_file():
        raise QFrameError(f"no tensorrt/model_int8.onnx in {str(run_dir)!r}; run python -m qframe with "
                          "export.enabled=true (the *_orin / *_desktop experiments) first")
    run = folder.parent if folder.name == "tensorrt" else folder
    return folder, run if (run / "metrics.json").is_file() else None


def _autocast(build, folder: Path) -> bool:
    """Make ``build.onnx`` with ModelOpt AutoCast (``build.prepare``); False when ModelOpt is not installed."""
    if importlib.util.find_spec("modelopt") is None:
        return False
    proc = subprocess.run(build.prepare, shell=True, cwd=folder, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("%s: AutoCast failed: %s", build.engine, (proc.stderr or proc.stdout).strip()[-300:])
    return proc.returncode == 0 and (folder / build.onnx).is_file()


def _detect_version(runner, folder: Path):
    from qframe.deploy.trtexec import banner_version
    from qframe.export.trt_plan import parse_version

    _, out = runner(["--help"], folder)
    if (v := banner_version(out)) is not None:
        return v
    try:
        import tensorrt
        return parse_version(tensorrt.__version__)
    except ImportError:
        raise QFrameError("trtexec printed no '[TensorRT vNNNN]' banner and tensorrt is not importable; pass "
                          "--trt-version") from None


def _accuracy(infer, engine_path: Path, build, folder: Path, tests, reference: str) -> dict:
    try:
        logits = infer(engine_path, build, folder)(tests.images)
    except QFrameError as exc:
        log.warning("%s: no accuracy: %s", build.engine, exc)
        return {"accuracy": None, "agreement": None, "accuracy_note": str(exc)}
    pred = np.asarray(logits).argmax(1)
    out = {"accuracy": 100.0 * float((pred == tests.labels).mean()), "images": int(len(pred))}
    if reference in tests.predictions:
        out.update(agreement=100.0 * float((pred == tests.predictions[reference]).mean()), reference=reference,
                   reference_accuracy=tests.accuracy[reference])
    return out


def _energy(reading, idle: float | None, qps: float) -> dict:
    if reading is None or reading.avg_watts is None:
        return {}
    net = reading.avg_watts - (idle or 0.0)
    jpi = net / qps if qps > 0 else None
    return {"watts": reading.avg_watts, "idle_watts": idle, "joules_per_image": jpi,
            "images_per_joule": 1.0 / jpi if jpi and jpi > 0 else None,
            "energy": (f"{reading.source}; {reading.joules:.3f} J over {reading.seconds:.2f} s of the timing run, "
                       f"{reading.avg_watts:.2f} W" + (f", idle {idle:.2f} W subtracted" if idle is not None else "")
                       + "; J/image = net watts / images per second")}


def deploy(run_dir, *, runner=None, infer=None, meter="auto", version=None, dla: bool | None = None, dla_core: int = 0,
           gpu_fallback: bool = True, duration_s: int = 10, iterations: int = 1000, idle_seconds: float = 3.0,
           sleep: Callable[[float], None] = time.sleep, prepare=None, write: bool = True) -> dict:
    """Build, check, time and meter every engine of ``run_dir``'s export; return (and write) the rows.

    ``runner``: runs trtexec (:data:`qframe.deploy.trtexec.Runner`; default: the trtexec found here).
    ``infer(engine_path, build, folder)`` returns a function from images to logits (default: the
    TensorRT Python runtime). ``meter``: an energy meter, None, or ``"auto"`` (the first of
    :func:`qframe.measure.energy.detect_meters`); its idle power over ``idle_seconds`` is measured
    once and subtracted. ``version``: the TensorRT version (default: trtexec's banner). ``dla``:
    build the DLA engines (default: the run's ``device.dla``). ``prepare(build, folder) -> bool``
    makes a missing FP16 ONNX (default: ModelOpt AutoCast where installed).
    """
    from qframe.deploy.trtexec import find_trtexec, parse_performance, subprocess_runner
    from qframe.export.tensorrt import _input_shape_args
    from qframe.export.testset import FILE_NAME, load_test_set
    from qframe.export.trt_plan import build_args, dla_unavailable_reason, engine_builds, parse_version, time_args
    from qframe.measure.energy import detect_meters, idle_watts

    folder, run = _folders(run_dir)
    metrics = json.loads((run / "metrics.json").read_text()) if run is not None else None
    if runner is None:
        if (trtexec := find_trtexec()) is None:
            raise QFrameError(NO_TENSORRT)
        runner = subprocess_runner(trtexec)
    if infer is None:
        from qframe.deploy.runtime import tensorrt_infer as infer
    tests = load_test_set(folder / FILE_NAME)
    version = parse_version(version) if version is not None else _detect_version(runner, folder)
    version_text = ".".join(map(str, version))
    if dla is None:
        dla = bool(metrics["target"]["dla"]) if metrics and metrics.get("target") else True
    files = (metrics or {}).get("export", {}) or {}
    label = next((k for k in files.get("files", {}) if k != "fp32" and not k.endswith("_onnxruntime")), "int8")
    builds = engine_builds(version, dla_core=dla_core, gpu_fallback=gpu_fallback,
                           fp32_onnx=(folder / "model_fp32.onnx").is_file(), dla=dla)
    skipped = [{"engine": "dla_*", "reason": r} for r in [dla_unavailable_reason(version)] if dla and r]
    shapes = _input_shape_args(folder / "model_int8.onnx", (1, *tests.images.shape[1:]))
    if meter == "auto":
        meter = next(iter(detect_meters()), None)
    idle = idle_watts(meter, idle_seconds, sleep=sleep) if meter is not None and idle_seconds > 0 else None
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "engines").mkdir(exist_ok=True)
    log.info("TensorRT %s: %d engines to build; energy %s", version_text, len(builds),
             type(meter).__name__ if meter is not None else "not measured (no meter here)")
    rows = []
    for b in builds:
        if b.prepare and not (folder / b.onnx).is_file() and not (prepare or _autocast)(b, folder):
            skipped.append({"engine": b.engine, "reason": b.skip_reason})
            continue
        rc, out = runner(build_args(b, shapes=shapes), folder)
        (folder / "logs" / f"{b.engine}.build.log").write_text(out)
        engine_path = folder / "engines" / f"{b.engine}.engine"
        if rc != 0 or not engine_path.is_file():
            lines = out.splitlines()
            last = next((x for x in lines if "[E]" in x), next((x for x in lines if "FAILED" in x), f"return code {rc}"))
            skipped.append({"engine": b.engine, "reason": f"build failed: {last.strip()[:200]}"})
            continue
        row = {"method": "tensorrt", "engine": b.engine, "precision": label if b.precision == "int8" else b.precision,
               "backend": f"TensorRT {version_text} / {b.device}" + (f" core {dla_core}" + (
                   " + GPU fallback" if gpu_fallback else "") if b.dla else "") + f", {b.path}",
               "trt_version": version_text, "build_path": b.path, "onnx": b.onnx,
               "size_bytes": engine_path.stat().st_size, "size_kib": engine_path.stat().st_size / 1024}
        reference = "fp32" if b.precision != "int8" else (  # the GPU rounds ties to even, the DLA away from zero
            f"{label}_half_even" if not b.dla and f"{label}_half_even" in tests.predictions else label)
        row.update(_accuracy(infer, engine_path, b, folder, tests, reference))
        if meter is not None:
            meter.start()
        try:
            rc, out = runner(time_args(b, shapes=shapes, iterations=str(iterations), duration=str(duration_s)), folder)
        finally:
            reading = meter.stop() if meter is not None else None
        (folder / "logs" / f"{b.engine}.time.log").write_text(out)
        try:
            perf = parse_performance(out)
        except QFrameError as exc:
            skipped.append({"engine": b.engine, "reason": f"timing failed: {exc}"})
            continue
        lat = perf["latency"]
        row.update(latency_ms=lat["median"], latency_p90_ms=lat.get("p90"), latency_batch=1,
                   throughput=perf["throughput_qps"], throughput_batch=1,
                   gpu_compute_ms=perf.get("gpu_compute", {}).get("median"), timing=perf,
                   energy="not measured (no energy meter here)")
        row.update(_energy(reading, idle, perf["throughput_qps"]))
        rows.append(row)
        log.info("%s: accuracy %s, median latency %.3f ms, %.0f images/s", b.engine,
                 "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2f}%", lat["median"], perf["throughput_qps"])
    result = {"trt_version": version_text, "rows": rows, "skipped": skipped, "dla": dla,
              "meter": type(meter).__name__ if meter is not None else None, "idle_watts": idle,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "test_images": int(len(tests.labels))}
    if write:
        _write(result, folder, run, metrics)
    return result


def table(result: dict) -> str:
    from qframe.measure.table import markdown_table

    def cells(row: dict) -> dict:  # sub-millisecond latencies and millijoules need more than two decimals
        out = dict(row)
        for key in ("latency_ms", "latency_p90_ms", "joules_per_image"):
            if isinstance(row.get(key), float):
                out[key] = f"{row[key]:.3g}"
        return out

    lines = [f"TensorRT {result['trt_version']}, {result['test_images']} test images; energy: "
             f"{result['meter'] or 'not measured (no meter here)'}", "",
             markdown_table([cells(r) for r in result["rows"]], DEPLOY_COLUMNS)]
    lines += [f"- {s['engine']} skipped: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def _write(result: dict, folder: Path, run: Path | None, metrics: dict | None) -> None:
    from qframe.report import write_report
    from qframe.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(result, folder / "deploy.json")
    atomic_write_text(table(result) + "\n", (run or folder) / "deploy.md")
    if metrics is None:
        return
    fp32 = next((r["accuracy"] for r in metrics["results"] if r.get("method") == "fp32"), None)
    for row in result["rows"]:
        row["delta"] = row["accuracy"] - fp32 if row.get("accuracy") is not None and fp32 is not None else None
    metrics["results"] = [r for r in metrics["results"] if r.get("method") != "tensorrt"] + result["rows"]
    metrics["deploy"] = {k: v for k, v in result.items() if k != "rows"}
    atomic_write_json(metrics, run / "metrics.json")
    write_report([{**metrics, "run_dir": str(run)}], run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qframe.deploy", description=__doc__)
    parser.add_argument("run_dir", help="a run directory of python -m qframe with export.enabled=true, or its tensorrt/")
    dla = parser.add_mutually_exclusive_group()
    dla.add_argument("--dla", dest="dla", action="store_true", default=None, help="build the DLA engines")
    dla.add_argument("--no-dla", dest="dla", action="store_false", help="GPU engines only")
    parser.add_argument("--dla-core", type=int, default=0)
    parser.add_argument("--no-gpu-fallback", action="store_true", help="DLA engines without GPU fallback")
    parser.add_argument("--duration", type=int, default=10, help="seconds each timing run lasts (default 10)")
    parser.add_argument("--iterations", type=int, default=1000, help="least inferences per timing run")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="idle power window; 0: gross energy")
    parser.add_argument("--trt-version", help="the TensorRT version, when trtexec's banner does not say it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in ("duration", "iterations"):
            if getattr(args, name) < 1:
                raise QFrameError(f"--{name}={getattr(args, name)} is invalid; valid: an integer >= 1")
        result = deploy(args.run_dir, dla=args.dla, dla_core=args.dla_core, gpu_fallback=not args.no_gpu_fallback,
                        duration_s=args.duration, iterations=args.iterations, idle_seconds=args.idle_seconds,
                        version=args.trt_version)
    except QFrameError as exc:
        print(f"qframe: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    return 0
