"""The sub-8-bit PTQ remedies on users' own models: `transformers` vision models at w4a8, a row each.

    python benchmarks/ptq_remedies_transformers.py        # writes benchmarks/results/ptq_remedies_transformers.{md,json}
    python benchmarks/ptq_remedies_transformers.py --models convnext cvt --no-write

Models: the test battery's (tests/third_party/hf_models.py; random init from small configs, BN running
statistics from the model's own activations as the battery sets them, nothing downloaded). For each,
``qframe.ptq`` at w4a8 on 4 x 16 structured random 64x64 images with nearest rounding, then with each remedy
(cross-layer equalization, bias correction, layer-wise AdaRound, block reconstruction, GPTQ), all three of CLE,
AdaRound (or GPTQ) and bias correction together, and mixed precision (``quant=auto``'s search, widths 2-8 bits for every
layer, given the bytes of that model's nearest-rounding w4a8 model, then PTQ with its recipe: the same size, so
the column says whether the search spends w4a8's bytes better than uniform 4 bits do). AdaRound runs ``--iterations`` steps per layer or block. Each cell: output
SQNR against the float model over 32 other images, in dB, over the part of the float output that varies from
image to image, or the error that stopped it. Random-init models: the SQNR says whether a remedy runs and
moves the error, not what it gains on a trained model (benchmarks/results/ptq_remedies_*.md has those).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import qframe
from qframe.bisect import sqnr_db
from qframe.utils.env import environment, results_header
from qframe.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "third_party"))
log = logging.getLogger("ptq_remedies_transformers")

AUTO = "auto at w4a8's bytes"
COLUMNS = ("nearest", "cle", "bias correction", "adaround", "adaround_block", "gptq", "cle + adaround + bc",
           "cle + gptq + bc", AUTO)


def _options(column: str, iterations: int) -> dict:
    ada = qframe.AdaRoundConfig(iterations=iterations)
    return {"nearest": {}, "cle": {"equalize": True}, "bias correction": {"bias_correction": True},
            "adaround": {"rounding": "adaround", "adaround": ada},
            "adaround_block": {"rounding": "adaround_block", "adaround": ada},
            "gptq": {"rounding": "gptq"},
            "cle + adaround + bc": {"equalize": True, "bias_correction": True, "rounding": "adaround", "adaround": ada},
            "cle + gptq + bc": {"equalize": True, "bias_correction": True, "rounding": "gptq"},
            AUTO: {}}[column]


def run(name: str, iterations: int) -> dict:
    from hf_models import build, images, normalise_bn, twins

    from qframe.measure.size import model_size_bytes
    from qframe.methods.mixed import search
    from qframe.quant.budget import Budget

    row = {"model": name, "sqnr_db": {}, "seconds": {}}
    pairs = twins(name)
    for float_type, twin in pairs:
        qframe.register_module(float_type, twin)
    try:
        torch.manual_seed(0)
        model = normalise_bn(build(name), images(32, 3)).eval()
        calib = [(images(16, s), None) for s in range(4)]
        x = images(32, 99)
        with torch.no_grad():
            ref = model(x)
        centred = ref.double() - ref.double().mean(0, keepdim=True)
        row["varying_share"] = float(centred.pow(2).sum() / ref.double().pow(2).sum())
        for column in COLUMNS:
            start = time.perf_counter()
            try:
                recipe = qframe.preset("w4a8")
                if column == AUTO:
                    budget = Budget(size_bytes=row["w4a8_bytes"])
                    recipe = search(model, qframe.preset("auto", budget=budget), calib, num_batches=4).recipe
                qmodel = qframe.ptq(model, recipe, calib, num_batches=4, **_options(column, iterations))
                if column == "nearest":
                    row["w4a8_bytes"], row["fp32_bytes"] = model_size_bytes(qmodel), model_size_bytes(model)
                elif column == AUTO:
                    row["auto_bytes"] = model_size_bytes(qmodel)
                with torch.no_grad():
                    out = qmodel(x).double()
                row["sqnr_db"][column] = sqnr_db(centred.numpy(), (centred + out - ref.double()).numpy())
            except Exception as exc:  # the cell says what stopped it
                row["sqnr_db"][column] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            row["seconds"][column] = round(time.perf_counter() - start, 1)
    finally:
        for float_type, _ in pairs:
            qframe.unregister_module(float_type)
    log.info("%s: %s", name, row)
    return row


def table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    def ratio(r, key):
        return f"{100 * r[key] / r['fp32_bytes']:.1f}" if key in r and "fp32_bytes" in r else ""

    lines = ["| model | output energy varying across images | " + " | ".join(COLUMNS) +
             " | w4a8 bytes, % of FP32 | auto bytes, % of FP32 | seconds, all columns |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['varying_share']:.1e} | " + " | ".join(cell(r["sqnr_db"][c]) for c in COLUMNS)
                     + f" | {ratio(r, 'w4a8_bytes')} | {ratio(r, 'auto_bytes')} | {sum(r['seconds'].values()):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from hf_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: the test battery's")
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound steps per layer or block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    rows = [run(name, args.iterations) for name in args.models or MODELS]
    env = environment()
    command = ("python benchmarks/ptq_remedies_transformers.py " +
               " ".join(sys.argv[1:] if argv is None else argv)).strip()
    import transformers

    failed = sum(isinstance(v, str) for r in rows for v in r["sqnr_db"].values())
    text = (results_header("The PTQ remedies on `transformers` models at w4a8", env, command,
                           transformers=transformers.__version__) +
            f"Output SQNR in dB against the float model (random init, BN statistics from the model's own "
            f"activations) over 32 structured random 64x64 images, over the part of the float output that varies "
            f"from image to image; calibration 4 x 16 others; AdaRound {args.iterations} steps per layer or block. "
            f"{len(rows)} models, {failed} cells stopped by an error. The second column is that part's share of the "
            f"float output's energy (YOLOS: its detection tokens read almost nothing of the image at random init). "
            f"Random networks amplify rounding noise on the way to the output, so the absolute figures are low; "
            f"the columns compare remedies on one model.\n\n"
            + table(rows) + "\n")
    print(text)
    if not args.no_write:
        atomic_write_text(text, RESULTS / "ptq_remedies_transformers.md")
        atomic_write_json({"environment": env, "command": command, "rows": rows},
                          RESULTS / "ptq_remedies_transformers.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
