"""qframe.convert's ConvTranspose2d on the CPU: its two engines against the fake-quant and FP32 layers.

    python benchmarks/convert_transpose.py               # writes benchmarks/results/convert_transpose.{md,json}
    python benchmarks/convert_transpose.py --no-write --rounds 3

Each row is one transposed convolution in the shape an upsampling head uses it (a U-Net decoder, SAM's
mask upscaling, DPT's reassemble stage, a DB text-detection head, an overlapping 4/2/1 one), PTQ'd
alone with a recipe (w8a8; w4a8 gives it 4-bit per-channel weights) on random calibration batches and
converted. Timed side by side, taking turns (``qframe.export.ort.time_in_turns``): the FP32 layer, the
fake-quant layer, the converted layer on qframe's engine (int8_mm / w4a8_mm GEMM over the input
positions, then col2im) and on the oneDNN engine (``auto`` on x86: a float transposed convolution with
the dequantized weight kept in memory, on the fake-quantized input). Ratios are paired medians over
rounds (fake-quant time / converted time: > 1 is faster). Error: largest difference from a float64
transposed convolution of the fake-quant layer's operands, relative to the largest output, on a fresh
input. col2im: qframe's strided adds against ``F.fold`` on the same columns.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import qframe
from qframe.export.ort import paired_ratio, time_in_turns
from qframe.kernels.convert import _col2im, resolve_engine
from qframe.quant.recipe import QuantizerConfig, QuantRecipe
from qframe.utils.env import environment, results_header
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (in, out, kernel, stride, padding, height = width, batch)
SHAPES = {
    "U-Net decoder 2x": (256, 128, 2, 2, 0, 32, 1),
    "U-Net decoder 2x, batch 8": (256, 128, 2, 2, 0, 32, 8),
    "SAM mask upscaling": (256, 64, 2, 2, 0, 64, 1),
    "DPT reassemble 4x": (96, 96, 4, 4, 0, 24, 1),
    "DB head 2x": (64, 16, 2, 2, 0, 160, 1),
    "overlapping 4/2/1": (128, 64, 4, 2, 1, 32, 1),
}
RECIPES = {"w8a8": 8, "w4a8": 4}
log = logging.getLogger("convert_transpose")


def _recipe(bits: int) -> QuantRecipe:
    return QuantRecipe(name=f"w{bits}a8", weight=QuantizerConfig(bits=bits, granularity="per_channel",
                                                                  observer="minmax" if bits == 8 else "mse"),
                       input=QuantizerConfig(bits=8, observer="percentile"))


def _error(fake: nn.Module, layer: nn.Module, x: torch.Tensor) -> float:
    q = fake[0]
    with torch.no_grad():
        ref = F.conv_transpose2d(q.input_quantizer(x).double(), q.weight_quantizer(q.weight).double(),
                                 q._quant_bias(q.bias, q.weight).double(), q.stride, q.padding, q.output_padding)
        return float((layer(x).double() - ref).abs().max() / ref.abs().max())


def row(name: str, recipe: str, rounds: int, runs: int, threads: int) -> dict:
    cin, cout, k, s, p, hw, batch = SHAPES[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p)).eval()
    calib = [torch.randn(8, cin, hw, hw) for _ in range(2)]
    fake = qframe.ptq(model, _recipe(RECIPES[recipe]), calib, num_batches=2)
    engines = {"qframe": qframe.convert(fake, engine="qframe"), "auto": qframe.convert(fake, engine="auto")}
    x = torch.randn(batch, cin, hw, hw)
    runners = {"fp32": model, "fake-quant": fake, **{f"converted {e}": m for e, m in engines.items()}}
    with torch.no_grad():
        times = time_in_turns(runners, x, batch, threads=threads, rounds=rounds, runs=runs, warmup=3)
        cols = torch.randn(batch, hw, hw, cout, k, k)
        size = [(hw - 1) * s - 2 * p + k]
        col2im = time_in_turns({
            "strided": lambda c: _col2im(c, (s, s), (p, p), (1, 1), (0, 0), None),
            "fold": lambda c: F.fold(c.reshape(batch, hw * hw, -1).transpose(1, 2), size * 2, k, 1, p, s)},
            cols, batch, threads=threads, rounds=rounds, runs=runs, warmup=2)
    fresh = torch.randn(batch, cin, hw, hw)
    out = {"layer": name, "recipe": recipe, "shape": {"in": cin, "out": cout, "kernel": k, "stride": s, "padding": p,
                                                      "hw": hw, "batch": batch},
           "path": engines["qframe"][0].path, "auto_engine": engines["auto"][0].engine,
           "ms": {n: t["median_ms"] for n, t in times.items()}}
    base = times["fake-quant"]["round_median_ms"]
    for e in engines:
        out[f"speedup_{e}"] = paired_ratio(base, times[f"converted {e}"]["round_median_ms"])
        out[f"error_{e}"] = _error(fake, engines[e], fresh)
    out["speedup_fp32"] = paired_ratio(base, times["fp32"]["round_median_ms"])
    out["col2im_ms"] = {n: t["median_ms"] for n, t in col2im.items()}
    out["col2im_fold_over_strided"] = paired_ratio(col2im["fold"]["round_median_ms"],
                                                   col2im["strided"]["round_median_ms"])
    log.info("%s %s: %s", name, recipe, out)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| layer | shape (in, out, k, s, p, HxW, batch) | recipe | FP32 ms | fake-quant ms | converted, qframe "
             "engine ms | converted, auto ms | fake-quant / qframe engine | fake-quant / auto | qframe engine error | "
             "auto error | col2im: F.fold / strided adds |", "|---" * 12 + "|"]
    for r in rows:
        sh, ms = r["shape"], r["ms"]
        shape = f"{sh['in']}, {sh['out']}, {sh['kernel']}, {sh['stride']}, {sh['padding']}, {sh['hw']}², {sh['batch']}"
        lines.append(
            f"| {r['layer']} | {shape} | {r['recipe']} ({r['path']}) | {ms['fp32']:.2f} | {ms['fake-quant']:.2f} | "
            f"{ms['converted qframe']:.2f} | {ms['converted auto']:.2f} ({r['auto_engine']}) | "
            f"{r['speedup_qframe'][0]:.2f}x | {r['speedup_auto'][0]:.2f}x | {r['error_qframe']:.1e} | "
            f"{r['error_auto']:.1e} | {r['col2im_fold_over_strided'][0]:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    rows = [row(name, recipe, args.rounds, args.runs, args.threads) for name in SHAPES for recipe in RECIPES]
    env = environment()
    engine = resolve_engine("auto")
    command = ("python benchmarks/convert_transpose.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = (results_header("qframe.convert's ConvTranspose2d on the CPU", env, command) +
            f"{args.threads} threads; `auto` resolves to the {engine[0]} engine here"
            f"{f' ({engine[1]} mode)' if engine[1] else ''}. Times: medians over {args.rounds} rounds x {args.runs} "
            "calls, taking turns; ratios: paired medians over rounds (> 1: the converted layer is faster than the "
            "fake-quant one). Error: max |converted - float64 reference| / max |reference| on a fresh input.\n\n"
            + table(rows) + "\n")
    print(text)
    if not args.no_write:
        atomic_write_text(text, RESULTS / "convert_transpose.md")
        atomic_write_json({"environment": env, "command": command, "rows": rows}, RESULTS / "convert_transpose.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
