"""Summed convolution branches merged into one convolution, or kept apart: layers, error, graph and latency.

    python benchmarks/branch_merge.py            # writes benchmarks/results/branch_merge.{md,json}

For `transformers` models with RepVGG-style blocks (PP-OCRv5's mobile detector on PP-LCNetV3, TextNet,
D-FINE, RT-DETR; random init from small configs as in transformers_sweep.py, nothing downloaded), w8a8
PTQ with ``merge_branches`` on and off, side by side in one run: quantized layers, output SQNR against
the FP32 model, the Q/DQ file's Conv, Add and BatchNormalization nodes, and the median onnxruntime
latency of the FP32 graph each form deploys (BN folded, branches merged or kept), batch 1 and 8.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import qframe
from qframe.utils.env import environment, results_header

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "third_party")]
MODELS = ["pp_ocrv5_mobile_det", "textnet", "d_fine", "rt_detr"]


def _latency_ms(session, x: np.ndarray, runs: int) -> float:
    feed = {session.get_inputs()[0].name: x}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(name: str, merge: bool, scratch: Path, runs: int, threads: int) -> dict:
    import onnx
    from hf_models import images
    from transformers_sweep import _sqnr, build

    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session
    from qframe.quant.fold import fold_bn
    from qframe.quant.modules import QUANT_LAYERS

    x, calib = images(16, 7), [(images(8, s), None) for s in range(2)]
    model = build(name)
    with torch.no_grad():
        ref = model(x)
    qmodel = qframe.ptq(model, qframe.preset("w8a8", merge_branches=merge), calib, num_batches=2)
    with torch.no_grad():
        sqnr = _sqnr(ref, qmodel(x))
    graph = onnx.load(str(export_onnx(qmodel, images(1, 5), scratch / f"{name}_{merge}_w8a8.onnx"))).graph
    ops = [n.op_type for n in graph.node]
    row = {"model": name, "merge": merge, "merged": sum(map(len, getattr(qmodel, "qframe_merged_branches", {}).values())),
           "quantized": sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()),
           "unfolded_bn": len(qmodel.qframe_unfolded_norms), "ptq_sqnr_db": round(sqnr, 1),
           **{f"onnx_{op.lower()}": ops.count(op) for op in ("Conv", "Add", "BatchNormalization")}}
    folded = build(name)
    fold_bn(folded, calib[0][0], merge)  # the FP32 graph each form deploys: BN folded, branches merged or not
    session = ort_session(str(export_onnx(folded, images(1, 5), scratch / f"{name}_{merge}_fp32.onnx")), threads)
    for batch in (1, 8):
        row[f"fp32_ms_b{batch}"] = round(_latency_ms(session, images(batch, 3).numpy(), runs), 3)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | branches | merged away | quantized layers | BN unfolded | PTQ SQNR dB | Q/DQ ONNX Conv / Add / "
             "BatchNormalization | FP32 folded ms, batch 1 | FP32 folded ms, batch 8 | speed-up b1 / b8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    apart = {r["model"]: r for r in rows if not r["merge"]}
    for r in rows:
        a = apart[r["model"]]
        speedup = f"{a['fp32_ms_b1'] / r['fp32_ms_b1']:.2f}x / {a['fp32_ms_b8'] / r['fp32_ms_b8']:.2f}x" if r["merge"] else ""
        lines.append(f"| {r['model']} | {'merged' if r['merge'] else 'apart'} | {r['merged']} | {r['quantized']} | "
                     f"{r['unfolded_bn']} | {r['ptq_sqnr_db']} | {r['onnx_conv']} / {r['onnx_add']} / "
                     f"{r['onnx_batchnormalization']} | {r['fp32_ms_b1']} | {r['fp32_ms_b8']} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from transformers_sweep import SETUP, publish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run(name, merge, Path(scratch), args.runs, args.threads) for name in args.models for merge in (False, True)]
    env = environment()
    command = ("python benchmarks/branch_merge.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    import onnxruntime
    import transformers

    text = (results_header("Summed convolution branches: merged into one convolution, or kept apart", env, command,
                           transformers=transformers.__version__, onnxruntime=onnxruntime.__version__) +
            SETUP + " (detectors: top-k among tied random-init scores makes theirs jumpy). Latency: the "
            f"FP32 graph each form deploys (BN folded, branches merged or not) in onnxruntime (CPU, {args.threads} "
            f"threads), median of {args.runs} runs at 64x64, both forms in this one run; not the Q/DQ files: on a "
            "CPU without VNNI onnxruntime's exact int8 kernels are slower than FP32 (docs/decisions.md), so "
            "there their time says how many layers run in int8, not what the merge saves.\n\n" + table(rows) + "\n")
    publish(text, "branch_merge", env, command, rows, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
