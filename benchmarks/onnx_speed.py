"""INT8 ONNX against FP32 ONNX in onnxruntime (CPU), per zoo model and method: lint, parity, speed.

    python benchmarks/onnx_speed.py --name digits
    python benchmarks/onnx_speed.py --name digits --models compact_cnn --epochs 1

For each model (compact_cnn, mobilenet_v2, resnet18 by default) one short run of qframe's own
pipeline: FP32 training (``--epochs``; a few, per model), then PTQ and QAT (``--qat-epochs``) from the
same FP32 model with each recipe of ``--quant`` (w8a8: laid out for TensorRT; w8a8_portable: a TensorRT
graph that onnxruntime's integer kernels run exactly; w8a8_ort: laid out for onnxruntime's integer
kernels), then, for each, the export stage a ``*_orin`` run uses
(:func:`qframe.export.stage.export_stage`): the TensorRT-form Q/DQ ONNX (checked by the TensorRT
lint), its onnxruntime form, top-1 agreement and max logit difference of each file against the
PyTorch fake-quant model on the test split, and FP32 / TensorRT form / onnxruntime form timed side
by side in onnxruntime (2 intra-op threads, ORT_ENABLE_ALL) at batch 1 and at a throughput batch.
The op types onnxruntime actually runs for the onnxruntime form (its optimized graph) are counted
too. Extra arguments are Hydra overrides. Writes benchmarks/results/onnx_speed_<name>.md and .json
with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("compact_cnn", "mobilenet_v2", "resnet18")
# short FP32 training that still gives a trained model: MobileNetV2 from scratch on 1259 images is
# at chance after 3 epochs (top-1 agreement on constant predictions would say nothing)
EPOCHS = {"compact_cnn": 3, "mobilenet_v2": 8, "resnet18": 3}
log = logging.getLogger("onnx_speed")


def _op_counts(path: Path) -> dict:
    """Op types of the graph onnxruntime runs for ``path`` (its optimized model)."""
    import onnx

    from qframe.export.onnx import ort_session, with_dynamic_batch

    with tempfile.TemporaryDirectory() as tmp:
        ort_session(with_dynamic_batch(path), 2, optimized_path=Path(tmp) / "optimized.onnx")
        graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def _one_model(name: str, args, overrides: list[str]) -> list[dict]:
    import torch

    from qframe.app import resolve_device, train_fp32
    from qframe.config import to_config
    from qframe.data import build_data
    from qframe.export.stage import ExportConfig, export_stage
    from qframe.methods.ptq import ptq
    from qframe.methods.qat import fold_qat, qat
    from qframe.quant.recipe import preset
    from qframe.train import evaluate

    with initialize_config_module(config_module="qframe.conf", version_base=None):
        cfg = to_config(compose(config_name="config", overrides=[
            f"model={name}", "quant=w8a8", "method=qat", "method.compare=[]",
            f"train.epochs={args.epochs if args.epochs is not None else EPOCHS[name]}",
            f"method.epochs={args.qat_epochs}", *overrides]))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    d = cfg.data
    data = build_data(d.name, root=d.root, image_size=d.image_size, channels=d.channels,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
    test = data.loader("test", 256)

    def calib():
        return data.loader("train", cfg.method.calib_batch_size, shuffle=True, seed=cfg.seed)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep) / name if args.keep else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = train_fp32(cfg, data, run_dir, device).eval()
        fp32_acc = evaluate(model, test, device)["accuracy"]
        qmodels = {}
        for recipe in args.quant:
            quant = preset(recipe)
            qmodels[("ptq", recipe)] = ptq(model, quant, calib(), cfg.method.calib_batches, device)
            qmodels[("qat", recipe)] = fold_qat(qat(model, quant, data, cfg.method.qat_config(), cfg.train,
                                                    calib_batches=calib(), num_batches=cfg.method.calib_batches,
                                                    device=device, seed=cfg.seed)).eval()
        log.info("%s: trained FP32 (%d epochs), PTQ and QAT (%d epoch) of %s in %.0f s", name, cfg.train.epochs,
                 cfg.method.epochs, ", ".join(args.quant), time.perf_counter() - start)
        for (method, recipe), qmodel in qmodels.items():
            label = f"{method}_{recipe}"
            target = "onnxruntime" if recipe.endswith("_ort") else "tensorrt"  # w8a8_ort is no TensorRT graph
            export_cfg = ExportConfig(enabled=True, tensorrt=False, timing_batch=args.batch, timing_runs=args.runs,
                                      threads=args.threads, target=target)
            out = run_dir / label
            out.mkdir(exist_ok=True)
            summary, _ = export_stage(export_cfg, model.cpu(), qmodel.cpu(), label, data, out, dla=False)
            ort = f"{label}_onnxruntime"
            results.append({
                "model": name, "method": method, "quant": recipe, "target": target, "ort_float_convs": summary["ort_float_convs"],
                "epochs": cfg.train.epochs, "qat_epochs": cfg.method.epochs,
                "fp32_accuracy": fp32_acc, "accuracy": evaluate(qmodel, test, device)["accuracy"],
                "lint": summary["lint"],
                "parity": {"fp32": summary["parity_fp32"], "tensorrt_form": summary[f"parity_{label}"],
                           "onnxruntime_form": summary[f"parity_{ort}"]},
                "timing": {form: summary["timing"][key] for form, key in
                           (("fp32", "fp32"), ("tensorrt_form", label), ("onnxruntime_form", ort))},
                "speedup": {str(b): {form: summary[f"int8_vs_fp32_speed_batch{b}"][key] for form, key in
                                     (("tensorrt_form", label), ("onnxruntime_form", ort))} for b in (1, args.batch)},
                "onnxruntime_ops": _op_counts(out / f"model_{ort}.onnx"),
                "file_kib": {form: (out / f).stat().st_size / 1024 for form, f in
                             (("fp32", "model_fp32.onnx"), ("tensorrt_form", f"model_{label}.onnx"),
                              ("onnxruntime_form", f"model_{ort}.onnx"))},
            })
    return results


def _lint_cell(r: dict) -> str:
    if not r["lint"]:
        return "pass"
    if r.get("target") == "onnxruntime":
        return f"n/a: uint8 layout ({len(r['lint'])} TRT rules)"
    return f"FAIL ({len(r['lint'])})"


def _table(results: list[dict], batch: int) -> str:
    forms = ("fp32", "tensorrt_form", "onnxruntime_form")
    head = ("| model | method | recipe | acc % FP32 / fake-quant | lint | agree % TRT / ORT form | max logit diff TRT / ORT | "
            f"batch {batch} ms FP32 / TRT / ORT | ORT-form speed-up | TRT-form speed-up | "
            "batch 1 ms FP32 / TRT / ORT | ORT-form speed-up | TRT-form speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p, t = r["parity"], r["timing"]

        def cells(key):
            ms = " / ".join(f"{t[f][key]['median_ms']:.3f}" for f in forms)
            up = r["speedup"]["1" if key == "1" else str(batch)]
            return f"{ms} | {up['onnxruntime_form']:.2f}x | {up['tensorrt_form']:.2f}x"

        lines.append(
            f"| {r['model']} | {r['method']} | {r['quant']} | {r['fp32_accuracy']:.2f} / {r['accuracy']:.2f} | "
            f"{_lint_cell(r)} | "
            f"{p['tensorrt_form']['agreement']:.2f} / {p['onnxruntime_form']['agreement']:.2f} | "
            f"{p['tensorrt_form']['max_logit_diff']:.3f} / {p['onnxruntime_form']['max_logit_diff']:.3f} | "
            f"{cells('throughput')} | {cells('1')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="label of the results files")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"FP32 training epochs (default per model: {EPOCHS})")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--quant", nargs="+", default=["w8a8", "w8a8_portable", "w8a8_ort"],
                        help="recipes: w8a8 lays the model out for TensorRT, w8a8_ort for onnxruntime's integer kernels, "
                             "w8a8_portable for both (TensorRT rules, no extra rounding in onnxruntime)")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per file and batch size")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--keep", default=None, help="keep each model's ONNX files under this folder (default: discard)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.image_size=32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("qframe.quant", "qframe.methods", "qframe.train", "qframe.export.ort_form"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import onnx
    import onnxruntime

    from qframe.config import register
    from qframe.utils.env import environment
    from qframe.utils.io import atomic_write_json, atomic_write_text

    register()
    results = []
    for name in args.models:
        results += _one_model(name, args, args.overrides)
    env = environment()
    env["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    command = "python benchmarks/onnx_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    m = env["machine"]
    epochs = ", ".join(dict.fromkeys(f"{r['model']} {r['epochs']}" for r in results))
    footer = (
        "\n\nTRT form: the TensorRT-form Q/DQ ONNX (lint-checked, handed to TensorRT); ORT form: its onnxruntime "
        "form (`qframe.export.ort_form.fastest_form`: the faster of 0 or 1 leading float Conv, timed; with w8a8 it "
        "adds uint8 Q/DQ calibrated on 8 train batches where the TensorRT layout leaves a tensor float, with "
        "w8a8_portable and w8a8_ort the model already quantizes those tensors, so the form adds no rounding; "
        "w8a8_portable keeps symmetric int8, so ReLU/ReLU6 stay as Clip ops on the codes). acc: test top-1 of the "
        f"FP32 model (trained {epochs} epochs; QAT {args.qat_epochs}) and of the PyTorch fake-quant model; "
        "agreement: top-1 agreement of each file with the fake-quant model on the test split. Latency: median of "
        f"{args.runs} calls per file, the files timed side by side in 10 interleaved rounds; speed-up: FP32 ONNX "
        "latency / INT8 latency, the median over rounds of the ratio of round medians (calls moments apart, so "
        f"bursts of other load cancel), onnxruntime CPU, {args.threads} intra-op threads, ORT_ENABLE_ALL.\nMachine: {m['cpu']} ({m['cores']} cores, "
        f"shared with other jobs: timings are noisy, compare ratios); torch {env['versions']['torch']}, onnx "
        f"{onnx.__version__}, onnxruntime {onnxruntime.__version__}; {env['date']}.\nCommand: `{command}`\n")
    table = _table(results, args.batch)
    print(table + footer)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f"# ONNX speed and parity: {args.name}\n\n" + table + footer, RESULTS / f"onnx_speed_{args.name}.md")
    atomic_write_json({"results": results, "command": command, "batch": args.batch, "threads": args.threads,
                       **env}, RESULTS / f"onnx_speed_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
