"""Converted (integer-weight) models against their fake-quant originals: agreement, size, speed.

    python benchmarks/convert.py                       # every zoo model, w8a8 / w4a8 / w4a16, digits at 32x32
    python benchmarks/convert.py --models compact_cnn --epochs 2 --no-write

For each zoo model (compact_cnn, mobilenet_v2 at width 0.5 as in conf/model, resnet18) at the
default data's resolution (digits, 32x32, one channel): train FP32 (``EPOCHS``), PTQ with each
recipe (8 calibration batches of 64, as ``method=ptq``), ``qframe.convert``, then over the test
split: the share of images where the converted model predicts the fake-quant model's class, both
accuracies, the largest logit difference, ``state_dict`` bytes against the FP32 model's, and the
median time of one forward pass over a batch of 64 test images (fake-quant and converted, on the
CPU with ``--threads`` threads). Writes benchmarks/results/convert_digits.md and .json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import qframe
from qframe.kernels import dispatch
from qframe.measure.timing import benchmark
from qframe.train import TrainConfig, fit
from qframe.utils.env import environment, machine_text
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("compact_cnn", "mobilenet_v2", "resnet18")
RECIPES = ("w8a8", "w4a8", "w4a16")
WIDTHS = {"mobilenet_v2": 0.5}  # as in conf/model/mobilenet_v2.yaml
EPOCHS = {"compact_cnn": 5, "mobilenet_v2": 15, "resnet18": 3}  # enough to train each on digits, briefly
log = logging.getLogger("convert")


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (what a checkpoint of it stores)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def compare(fake: torch.nn.Module, converted: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    yf, yc = fake(images), converted(images)
    pf, pc = yf.argmax(1), yc.argmax(1)
    return {"agreement": (pf == pc).double().mean().item() * 100, "mismatches": int((pf != pc).sum()),
            "accuracy_fake_quant": (pf == labels).double().mean().item() * 100,
            "accuracy_converted": (pc == labels).double().mean().item() * 100,
            "max_logit_diff": (yf - yc).abs().max().item()}


def latency_ms(model: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return benchmark(model, batch, warmup=1, runs=5).median_ms


def run_model(name: str, data, recipes, epochs: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = qframe.build_model(name, data.num_classes, data.channels, data.image_size, width_mult=WIDTHS.get(name, 1.0))
    fit(model, data, TrainConfig(epochs=epochs, batch_size=64), seed=seed, desc=name)
    model.eval()
    images, labels = data.test.tensors
    batch = images[:64]
    fp32_bytes = state_dict_bytes(model)
    fp32_acc = (model(images).argmax(1) == labels).double().mean().item() * 100 if len(images) else float("nan")
    rows = []
    for recipe in recipes:
        calib = data.loader("train", 64, shuffle=True, seed=seed)
        fake = qframe.ptq(model, qframe.preset(recipe), calib, num_batches=8)
        converted = qframe.convert(fake)
        paths = sorted({m.path for m in converted.modules() if hasattr(m, "path")})
        kept = sum(1 for m in converted.modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear"))
        rows.append({"model": name, "recipe": recipe, "fp32_accuracy": fp32_acc,
                     **compare(fake, converted, images, labels),
                     "fp32_bytes": fp32_bytes, "converted_bytes": state_dict_bytes(converted),
                     "size_ratio": state_dict_bytes(converted) / fp32_bytes, "paths": paths, "kept_fake_quant": kept,
                     "fake_quant_ms": latency_ms(fake, batch), "converted_ms": latency_ms(converted, batch)})
    return rows


def table(rows: list[dict]) -> str:
    head = ["model", "recipe", "agreement %", "mismatches", "FP32 acc %", "fake-quant acc %", "converted acc %",
            "max logit diff", "state_dict bytes (FP32)", "converted bytes", "size vs FP32", "fake-quant ms",
            "converted ms", "integer paths"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["recipe"], f"{r['agreement']:.2f}", str(r["mismatches"]), f"{r['fp32_accuracy']:.1f}",
            f"{r['accuracy_fake_quant']:.1f}", f"{r['accuracy_converted']:.1f}", f"{r['max_logit_diff']:.1e}",
            f"{r['fp32_bytes']:,}", f"{r['converted_bytes']:,}", f"{100 * r['size_ratio']:.1f}%",
            f"{r['fake_quant_ms']:.1f}", f"{r['converted_ms']:.1f}", ", ".join(r["paths"])]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"FP32 training epochs for every model (default per model: {EPOCHS})")
    parser.add_argument("--image-size", type=int, default=32, help="digits resolution (default 32, the config's)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    data = qframe.build_data("digits", image_size=args.image_size, channels=1, seed=args.seed)
    rows = []
    for name in tqdm(args.models, desc="models", unit="model", disable=None):
        rows += run_model(name, data, args.recipes, args.epochs or EPOCHS[name], args.seed)

    env = environment()
    command = ("python benchmarks/convert.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    machine = env["machine"]
    backends = {b: dispatch.available(b, "cpu")[1] for b in ("cpu",)}
    text = (
        f"# Converted models: digits {args.image_size}x{args.image_size}\n\n"
        f"Machine: {machine_text(machine, f'{torch.get_num_threads()} torch threads')}. "
        f"Versions: torch {env['versions']['torch']}, python {env['versions']['python']}. Date: {env['date']}.\n"
        f"Command: `{command}`\nCPU kernels: {backends['cpu']}.\n\n"
        f"FP32 trained {args.epochs or ', '.join(f'{m} {EPOCHS[m]}' for m in args.models)} epochs; PTQ with 8 calibration batches of 64; {len(data.test)} test images. "
        "Agreement: share of test images where `qframe.convert`'s model predicts the fake-quant model's class. "
        "Sizes: bytes of all `state_dict` tensors. Times: median forward pass over 64 test images on the CPU. "
        "Integer paths: how the converted layers run (`dequantize` = int8 weights dequantized for a float "
        "layer, where no integer op applies: 8-bit weights with float inputs).\n\n"
        + table(rows) + "\n"
    )
    print("\n" + text)
    if not args.no_write:
        name = f"digits{'' if args.image_size == 32 else args.image_size}"
        atomic_write_text(text, RESULTS / f"convert_{name}.md")
        atomic_write_json({"command": command, **env, "epochs": {m: args.epochs or EPOCHS[m] for m in args.models},
                           "image_size": args.image_size,
                           "test_images": len(data.test), "rows": rows}, RESULTS / f"convert_{name}.json")
        log.info("wrote %s and .json", RESULTS / f"convert_{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
