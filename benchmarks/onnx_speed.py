"""INT8 ONNX against FP32 ONNX in onnxruntime (CPU), per zoo model and method: lint, parity, size, speed.

    python benchmarks/onnx_speed.py --name digits --keep runs/onnx_speed
    python benchmarks/onnx_speed.py --name digits_ort_latest --reuse runs/onnx_speed   # same models, other onnxruntime

For each model (compact_cnn, mobilenet_v2, resnet18 by default) one short run of qframe's own
pipeline: FP32 training (``--epochs``; a few, per model), then PTQ and QAT (``--qat-epochs``) at
``--quant`` from the same FP32 model, then, for each, the export stage a ``*_orin`` run uses
(:func:`qframe.export.stage.export_stage`): the Q/DQ ONNX in qframe's standard form and its onnxruntime
form, the TensorRT lint, top-1 agreement and max logit difference against the PyTorch model on the
test split at ORT_ENABLE_BASIC and ORT_ENABLE_ALL, file sizes, and FP32 / standard / onnxruntime form
timed side by side in onnxruntime (2 intra-op threads, ORT_ENABLE_ALL) at batch 1 and at a throughput
batch. ``--keep`` saves the
trained and quantized PyTorch models; ``--reuse`` loads them instead of training, so a second run
(e.g. with another onnxruntime) checks the very same ONNX files (the table shows their SHA-256).
Extra arguments are Hydra overrides. Writes benchmarks/results/onnx_speed_<name>.md and .json with
the machine, versions, load average and date.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
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
    """Op types of the graph onnxruntime runs for ``path`` at ORT_ENABLE_ALL (its optimized model)."""
    import onnx

    from qframe.export.ort import ort_session, with_dynamic_batch

    with tempfile.TemporaryDirectory() as tmp:
        ort_session(with_dynamic_batch(path), 2, optimized_path=Path(tmp) / "optimized.onnx")
        graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def _models(name: str, cfg, data, run_dir: Path, args) -> tuple:
    """The FP32 model and ``{(method, recipe): quantized model}``: trained here, or loaded from ``--reuse``."""
    import torch

    from qframe.app import resolve_device, train_fp32
    from qframe.methods.ptq import ptq
    from qframe.methods.qat import fold_qat, qat
    from qframe.quant.recipe import preset

    keys = [(method, recipe) for recipe in args.quant for method in ("ptq", "qat")]
    if args.reuse:
        folder = Path(args.reuse) / name
        load = lambda f: torch.load(folder / f, weights_only=False).eval()  # noqa: E731
        return load("fp32_model.pt"), {k: load(f"{k[0]}_{k[1]}_model.pt") for k in keys}
    device = resolve_device(cfg.device)
    model = train_fp32(cfg, data, run_dir, device).eval()

    def calib():
        return data.loader("train", cfg.method.calib_batch_size, shuffle=True, seed=cfg.seed)

    qmodels = {}
    for method, recipe in keys:
        quant = preset(recipe)
        if method == "ptq":
            qmodels[(method, recipe)] = ptq(model, quant, calib(), cfg.method.calib_batches, device)
        else:
            qmodels[(method, recipe)] = fold_qat(qat(model, quant, data, cfg.method.qat_config(), cfg.train,
                                                     calib_batches=calib(), num_batches=cfg.method.calib_batches,
                                                     device=device, seed=cfg.seed)).eval()
    if args.keep:
        torch.save(model.cpu(), run_dir / "fp32_model.pt")
        for (method, recipe), qmodel in qmodels.items():
            torch.save(qmodel.cpu(), run_dir / f"{method}_{recipe}_model.pt")
    return model, qmodels


def _one_model(name: str, args, overrides: list[str]) -> list[dict]:
    import torch

    from qframe.config import to_config
    from qframe.data import build_data
    from qframe.export.stage import ExportConfig, export_stage
    from qframe.train import evaluate

    with initialize_config_module(config_module="qframe.conf", version_base=None):
        cfg = to_config(compose(config_name="config", overrides=[
            f"model={name}", "quant=w8a8", "method=qat", "method.compare=[]",
            f"train.epochs={args.epochs if args.epochs is not None else EPOCHS[name]}",
            f"method.epochs={args.qat_epochs}", *overrides]))
    torch.manual_seed(cfg.seed)
    d = cfg.data
    data = build_data(d.name, root=d.root, image_size=d.image_size, channels=d.channels,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
    test = data.loader("test", 256)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep) / name if args.keep else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model, qmodels = _models(name, cfg, data, run_dir, args)
        fp32_acc = evaluate(model, test, "cpu")["accuracy"]
        log.info("%s: FP32, PTQ and QAT of %s %s in %.0f s", name, ", ".join(args.quant),
                 "loaded" if args.reuse else "trained", time.perf_counter() - start)
        for (method, recipe), qmodel in qmodels.items():
            label = f"{method}_{recipe}"
            # min_agreement 0: the table records every agreement, the export stage's check is tested elsewhere
            export_cfg = ExportConfig(enabled=True, tensorrt=False, timing_batch=args.batch, timing_runs=args.runs,
                                      threads=args.threads, min_agreement=0.0)
            out = run_dir / label
            out.mkdir(exist_ok=True)
            summary, _ = export_stage(export_cfg, model.cpu(), qmodel.cpu(), label, data, out, dla=False)
            int8 = out / f"model_{label}.onnx"
            forms = {"fp32": "fp32", "int8": label, "onnxruntime_form": f"{label}_onnxruntime"}
            results.append({
                "model": name, "method": method, "quant": recipe, "epochs": cfg.train.epochs,
                "qat_epochs": cfg.method.epochs, "fp32_accuracy": fp32_acc,
                "accuracy": evaluate(qmodel, test, "cpu")["accuracy"], "lint": summary["lint"],
                "parity": {f: summary[f"parity_{key}"] for f, key in forms.items()},
                "timing": {f: summary["timing"][key] for f, key in forms.items()},
                "speedup": {str(b): {f: summary[f"int8_vs_fp32_speed_batch{b}"][key] for f, key in forms.items()
                                     if f != "fp32"} for b in (1, args.batch)},
                "size_bytes": {f: summary["size_bytes"][key] for f, key in forms.items()},
                "size_ratio": summary["size_ratio"], "sha256": hashlib.sha256(int8.read_bytes()).hexdigest(),
                "onnxruntime_ops": {f: _op_counts(out / f"model_{forms[f]}.onnx") for f in ("int8", "onnxruntime_form")},
            })
    return results


def _table(results: list[dict], batch: int) -> str:
    head = ("| model | method | acc % FP32 / PyTorch INT8 | lint | agree % BASIC / ALL (ORT form) | max logit diff "
            f"BASIC / ALL | KiB FP32 / INT8 (ratio) | batch {batch} ms FP32 / INT8 / ORT form | speed-up INT8 (ORT form) "
            "| batch 1 ms FP32 / INT8 / ORT form | speed-up INT8 (ORT form) | INT8 file SHA-256 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    forms = ("fp32", "int8", "onnxruntime_form")
    for r in results:
        p, o, t, kib = r["parity"]["int8"], r["parity"]["onnxruntime_form"], r["timing"], r["size_bytes"]
        lint = "pass" if not r["lint"] else f"FAIL ({len(r['lint'])})"
        ms = {key: " / ".join(f"{t[f][key]['median_ms']:.3f}" for f in forms) for key in ("throughput", "1")}
        up = {b: f"{r['speedup'][b]['int8']:.2f}x ({r['speedup'][b]['onnxruntime_form']:.2f}x)" for b in r["speedup"]}
        lines.append(
            f"| {r['model']} | {r['method']} {r['quant']} | {r['fp32_accuracy']:.2f} / {r['accuracy']:.2f} | {lint} | "
            f"{p['basic']['agreement']:.2f} / {p['all']['agreement']:.2f} ({o['basic']['agreement']:.2f} / "
            f"{o['all']['agreement']:.2f}) | {p['basic']['max_logit_diff']:.3f} / {p['all']['max_logit_diff']:.3f} | "
            f"{kib['fp32'] / 1024:.0f} / {kib['int8'] / 1024:.0f} ({r['size_ratio']:.3f}) | {ms['throughput']} | "
            f"{up[str(batch)]} | {ms['1']} | {up['1']} | `{r['sha256'][:12]}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="label of the results files")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"FP32 training epochs (default per model: {EPOCHS})")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--quant", nargs="+", default=["w8a8"], help="recipes (quant/ presets)")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per file and batch size")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--keep", default=None, help="keep each model's PyTorch models and ONNX files under this folder")
    parser.add_argument("--reuse", default=None, help="load the PyTorch models a --keep run saved instead of training")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.image_size=32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("qframe.quant", "qframe.methods", "qframe.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import onnx
    import onnxruntime

    from qframe.config import register
    from qframe.utils.env import environment, machine_text
    from qframe.utils.io import atomic_write_json, atomic_write_text

    register()
    load = os.getloadavg()
    results = []
    for name in args.models:
        results += _one_model(name, args, args.overrides)
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    env = environment()
    env["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    command = "python benchmarks/onnx_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    m = env["machine"]
    peak_load = " / ".join(f"{v:.1f}" for v in load)
    epochs = ", ".join(dict.fromkeys(f"{r['model']} {r['epochs']}" for r in results))
    footer = (
        "\n\nINT8: the Q/DQ ONNX in qframe's standard form (`qframe.export.onnx.export_onnx`), the one file that is "
        "checked by the TensorRT lint, handed to TensorRT and run by onnxruntime; ORT form: its onnxruntime form "
        "(`qframe.export.ort_form.onnxruntime_form`: uint8 codes, clamps on the codes; no TensorRT graph). acc: test "
        "top-1 of the FP32 model "
        f"(trained {epochs} epochs; QAT {args.qat_epochs}) and of the PyTorch INT8 (fake-quant) model; agreement: "
        "top-1 agreement of the INT8 file with the PyTorch INT8 model on the test split, at ORT_ENABLE_BASIC (the "
        "graph's own semantics) and ORT_ENABLE_ALL (onnxruntime's integer fusions, the timed level). Latency: median "
        f"of {args.runs} calls per file, the three files timed side by side in 10 interleaved rounds; speed-up: FP32 "
        "latency / INT8 latency, the median over rounds of the ratio of round medians (calls moments apart, so "
        f"bursts of other load cancel), onnxruntime CPU, {args.threads} intra-op threads.\nMachine: "
        f"{machine_text(m, 'shared with other jobs: 1/5/15-minute load average up to ' + peak_load + ' during the run')} "
        f"(compare ratios); torch {env['versions']['torch']}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; {env['date']}.\nCommand: `{command}`\n")
    table = _table(results, args.batch)
    print(table + footer)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f"# ONNX speed and parity: {args.name}\n\n" + table + footer, RESULTS / f"onnx_speed_{args.name}.md")
    atomic_write_json({"results": results, "command": command, "batch": args.batch, "threads": args.threads,
                       "load_average": load, **env}, RESULTS / f"onnx_speed_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
