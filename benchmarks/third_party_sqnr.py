"""PTQ w8a8 on third-party CNNs: qframe's default recipe against NVIDIA ModelOpt's INT8 default, by output SQNR.

    python benchmarks/third_party_sqnr.py                  # every CNN; writes benchmarks/results/third_party_sqnr.{md,json}
    python benchmarks/third_party_sqnr.py --models resnet --no-write

Models: the convolutional `transformers` vision models of tests/third_party (ResNet, MobileNetV2,
ConvNeXt, EfficientNet, RegNet, MobileViT; random init from small configs, 64x64 inputs, BN
running statistics randomised so that folding matters) and qframe's zoo (compact_cnn,
mobilenet_v2 x0.5, resnet18; 3 channels, 64x64). For each, both tools quantize the same FP32 model
with the same calibration batches (4 x 16 structured random images: smooth blobs plus noise) and
are scored on 64 fresh images: SQNR = 10 log10(|y|^2 / |y_q - y|^2) over the logits, in dB.

* qframe: ``qframe.ptq(model, qframe.preset("w8a8"), calib)`` (BN folded, per-channel int8 weights,
  per-tensor int8 activations with the percentile observer, quantized residual adds);
* ModelOpt: ``mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)`` (per-channel int8 weights,
  per-tensor int8 activations calibrated with max), where ``modelopt`` imports; else its column says so.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from pathlib import Path

import torch
from torch import nn

import qframe
from qframe.utils.env import environment, results_header
from qframe.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "third_party"))
THIRD_PARTY_CNNS = ("resnet", "mobilenet_v2", "convnext", "efficientnet", "regnet", "mobilevit")
ZOO = ("compact_cnn", "mobilenet_v2", "resnet18")
log = logging.getLogger("third_party_sqnr")


def build(name: str) -> nn.Module:
    from hf_models import Logits, configs, randomise_bn

    torch.manual_seed(0)
    if name.startswith("zoo:"):
        arch = name[4:]
        return randomise_bn(qframe.build_model(arch, 10, 3, 64, width_mult=0.5 if arch == "mobilenet_v2" else 1.0)).eval()
    return Logits(randomise_bn(configs()[name]().eval())).eval()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (out - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def qframe_ptq(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    return qframe.ptq(model, qframe.preset("w8a8"), [(x, None) for x in calib], num_batches=len(calib))


def modelopt_ptq(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    import modelopt.torch.quantization as mtq

    def forward_loop(m):
        with torch.no_grad():
            for x in calib:
                m(x)

    return mtq.quantize(copy.deepcopy(model), mtq.INT8_DEFAULT_CFG, forward_loop)


def modelopt_version() -> str | None:
    try:
        import modelopt

        return getattr(modelopt, "__version__", "unknown")
    except ImportError:
        return None


def run(name: str) -> dict:
    from hf_models import images

    model = build(name)
    calib = [images(16, seed) for seed in range(4)]
    test = images(64, 100)
    with torch.no_grad():
        ref = model(test)
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    for tool, quantize in (("qframe", qframe_ptq), ("modelopt", modelopt_ptq)):
        try:
            qmodel = quantize(model, calib)
            with torch.no_grad():
                row[tool] = sqnr_db(ref, qmodel(test))
        except ImportError as exc:
            row[tool], row[f"{tool}_error"] = None, f"not installed ({exc})"
        except Exception as exc:  # a tool that cannot take this model: say so in its cell
            row[tool], row[f"{tool}_error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if row["qframe"] is not None and row["modelopt"] is not None:
        row["difference_db"] = row["qframe"] - row["modelopt"]
    log.info("%s: qframe %s dB, modelopt %s dB", name, row["qframe"], row["modelopt"])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | qframe w8a8 SQNR dB | ModelOpt INT8 default SQNR dB | qframe - ModelOpt dB |",
             "|---|---|---|---|---|"]

    def cell(row, key):
        v = row.get(key)
        return f"{v:.2f}" if isinstance(v, float) else (row.get(f"{key}_error") or "n/a")

    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {cell(r, 'qframe')} | {cell(r, 'modelopt')} | "
                     f"{cell(r, 'difference_db')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(THIRD_PARTY_CNNS) + [f"zoo:{z}" for z in ZOO])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [run(name) for name in args.models]
    env = environment()
    within = [r for r in rows if r.get("difference_db") is not None]
    verdict = (f"qframe within 1 dB of ModelOpt or better on {sum(r['difference_db'] >= -1 for r in within)} of "
               f"{len(within)} models compared.")
    command = ("python benchmarks/third_party_sqnr.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = (results_header("PTQ w8a8 output SQNR: qframe against ModelOpt", env, command,
                           transformers=_version("transformers"), **{"nvidia-modelopt": modelopt_version()}) +
            "Random-init models (random BN statistics), the same 4 x 16 calibration images for both tools, SQNR of "
            "the logits on 64 fresh images (higher is better). See the script's docstring for both recipes.\n\n"
            f"{table(rows)}\n\n{verdict}\n")
    print("\n" + text)
    if not args.no_write:
        atomic_write_text(text, RESULTS / "third_party_sqnr.md")
        atomic_write_json({"command": command, **env, "modelopt": modelopt_version(), "rows": rows},
                          RESULTS / "third_party_sqnr.json")
    return 0


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
