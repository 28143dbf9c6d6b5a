"""Sub-8-bit PTQ with its remedies: test accuracy of nearest rounding, then each remedy added, and mixed precision.

    python benchmarks/ptq_remedies.py                                 # every setup below
    python benchmarks/ptq_remedies.py --setups default,compact_cnn --orl-root ../shared/data/orl_faces
    python benchmarks/ptq_remedies.py --setups default --presets w4a8 --no-write

Setups (the app's own configs, composed with Hydra, so each row is what ``python -m qframe`` with the
same overrides gives):

* ``default``: MobileNetV2 x0.5 on the bundled digits (32x32, one channel);
* ``compact_cnn`` and ``resnet18``: the same data, ``model=compact_cnn`` / ``model=resnet18``;
* ``orl``: ORL faces, ``data=imagefolder data.root=<--orl-root> data.channels=1 model=compact_cnn
  train.epochs=80``.

For each setup the FP32 model is trained once (or loaded from ``--cache``), then quantized with each
preset by: nearest rounding; + cross-layer equalization (``method.equalize=true``); + bias correction
(``method.bias_correction=true``); + AdaRound layer by layer (``method.rounding=adaround``); GPTQ instead of
AdaRound, alone, with bias correction and with both CLE and bias correction (``method.rounding=gptq``); block-wise AdaRound instead
(``method.rounding=adaround_block``). The default setup also gets mixed
precision (``quant=auto``, model bytes <= 18 % of FP32's) with nearest rounding, with CLE + bias correction +
AdaRound and with GPTQ.
Every row gives test accuracy, its difference to FP32, model size and the wall-clock seconds of the
quantization step (calibration, search and remedies; training excluded). Writes
``benchmarks/results/ptq_remedies_<setup>.{md,json}`` with machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("ptq_remedies")

SETUPS = {
    "default": ([], ["w4a8", "w4a4", "w3a3"]),
    "compact_cnn": (["model=compact_cnn"], ["w4a8"]),
    "resnet18": (["model=resnet18"], ["w4a8"]),
    "orl": (["data=imagefolder", "data.root={orl}", "data.channels=1", "model=compact_cnn", "train.epochs=80"],
            ["w4a8", "w4a4", "w3a3"]),
}
# (label, method overrides), each remedy added to the one before; GPTQ replaces AdaRound, and so does the block-wise
# row (the last: run_setup treats it apart)
VARIANTS = [
    ("nearest", {}),
    ("+cle", {"equalize": True}),
    ("+cle+bc", {"equalize": True, "bias_correction": True}),
    ("+cle+bc+adaround", {"equalize": True, "bias_correction": True, "rounding": "adaround"}),
    ("+gptq", {"rounding": "gptq"}),
    ("+bc+gptq", {"bias_correction": True, "rounding": "gptq"}),
    ("+cle+bc+gptq", {"equalize": True, "bias_correction": True, "rounding": "gptq"}),
    ("+cle+bc+adaround_block", {"equalize": True, "bias_correction": True, "rounding": "adaround_block"}),
]
MIXED_BUDGET = 0.18


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from qframe.config import register, to_config

    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


def quantize_row(cfg, recipe, model, data, fp32: dict, device, label: str, options: dict, mixed: bool = False) -> dict:
    from qframe.measure.size import model_size_bytes
    from qframe.methods.mixed import search
    from qframe.methods.ptq import ptq
    from qframe.train import evaluate

    method = dataclasses.replace(cfg.method, **options)

    def calib():
        return data.loader("train", method.calib_batch_size, shuffle=True, seed=cfg.seed)

    start = time.perf_counter()
    precision = recipe.name
    if mixed:
        result = search(model, recipe, calib(), method.calib_batches, device, equalize=method.equalize, seed=cfg.seed)
        recipe = result.recipe
        precision = f"{recipe.name} ({result.chosen.cost:.3f} of FP32 bytes)"
    o = method.ptq_options()
    qmodel = ptq(model, recipe, calib(), method.calib_batches, device, equalize=o.equalize,
                 bias_correction=o.bias_correction, rounding=o.rounding, adaround=o.adaround, gptq=o.gptq)
    seconds = time.perf_counter() - start
    metrics = evaluate(qmodel, data.loader("test", 256), device)
    size = model_size_bytes(qmodel)
    row = {"precision": precision, "variant": label, "accuracy": metrics["accuracy"],
           "delta": metrics["accuracy"] - fp32["accuracy"], "size_bytes": size,
           "size_ratio": size / fp32["size_bytes"], "seconds": round(seconds, 1)}
    log.info("%s %s: %.2f %% (FP32 %.2f %%), %.1f s", precision, label, row["accuracy"], fp32["accuracy"], seconds)
    return row


def run_setup(name: str, orl_root: str, cache: Path, presets: list[str] | None, on_row=None,
              variants: list[str] | None = None, block_iterations: int | None = None,
              drop_prob: float | None = None) -> dict:
    """The rows of one setup; ``on_row(result so far)`` after each (results are written as they come)."""
    from qframe.app import resolve_device, train_fp32
    from qframe.data import build_data
    from qframe.measure.size import model_size_bytes
    from qframe.quant.budget import Budget
    from qframe.quant.recipe import preset
    from qframe.train import evaluate

    overrides, default_presets = SETUPS[name]
    overrides = [o.format(orl=orl_root) for o in overrides]
    cfg = compose_config(overrides)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    d = cfg.data
    data = build_data(d.name, root=d.root, image_size=d.image_size, channels=d.channels,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
    run_dir = cache / name
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = train_fp32(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto")), data, run_dir,
                       device).eval()
    train_s = time.perf_counter() - start
    fp32 = {**evaluate(model, data.loader("test", 256), device), "size_bytes": model_size_bytes(model)}
    rows = [{"precision": "fp32", "variant": "", "accuracy": fp32["accuracy"], "delta": 0.0,
             "size_bytes": fp32["size_bytes"], "size_ratio": 1.0, "seconds": None}]
    result = {"setup": name, "overrides": overrides, "model": cfg.model.name, "data": d.name,
              "test_images": len(data.test), "train_s": round(train_s, 1), "rows": rows, "complete": False}
    wanted = lambda label: variants is None or label in variants
    block_label, block_options = VARIANTS[-1]
    block_cfg = cfg.method.adaround
    if block_iterations is not None:
        block_label = f"{block_label} ({block_iterations} it.)"
        block_cfg = dataclasses.replace(block_cfg, iterations=block_iterations)
    if drop_prob is not None:
        block_label = f"{block_label} (QDrop {drop_prob:g})"
        block_cfg = dataclasses.replace(block_cfg, drop_prob=drop_prob)
    block_options = {**block_options, "adaround": block_cfg}
    jobs = [(label, options, p) for label, options in VARIANTS[:-1] if wanted(label) for p in presets or default_presets]
    if name == "default" and presets is None and wanted("mixed"):
        jobs += [(f"mixed {label}", options, None) for label, options in VARIANTS
                 if label in ("nearest", "+cle+bc+adaround", "+gptq")]
    if wanted(VARIANTS[-1][0]):  # the slowest rows last
        jobs += [(block_label, block_options, p) for p in presets or default_presets]
    for label, options, p in jobs:
        if p is None:
            recipe = preset("auto", budget=Budget(size_ratio=MIXED_BUDGET))
            rows.append(quantize_row(cfg, recipe, model, data, fp32, device, label, options, mixed=True))
        else:
            rows.append(quantize_row(cfg, preset(p), model, data, fp32, device, label, options))
        if on_row is not None:
            on_row(result)
    result["complete"] = True
    return result


def table(result: dict) -> str:
    lines = [f"### {result['setup']}: {result['model']} on {result['data']} ({result['test_images']} test images; "
             f"`{' '.join(result['overrides']) or 'defaults'}`)", "",
             "| precision | PTQ | test acc % | Δ vs FP32 | size KiB | × of FP32 bytes | quantize s |",
             "|---|---|---|---|---|---|---|"]
    order = [v for v, _ in VARIANTS]
    rank = lambda r: (r["variant"].startswith("mixed"), r["precision"] != "fp32", r["precision"].split(" ")[0],
                      order.index(r["variant"]) if r["variant"] in order else len(order))
    for r in sorted(result["rows"], key=rank):  # by precision, the variants in the order they add remedies
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['precision']} | {r['variant']} | {r['accuracy']:.2f} | {r['delta']:+.2f} | "
                     f"{r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--presets", default=None, help="comma-separated quant presets (default: per setup)")
    parser.add_argument("--orl-root", default="../shared/data/orl_faces", help="the ORL faces folder")
    parser.add_argument("--cache", default="runs/ptq_remedies", help="where trained FP32 models are kept")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated rows to run, of: {', '.join(v for v, _ in VARIANTS)}, mixed (default: all)")
    parser.add_argument("--block-iterations", type=int, default=None,
                        help="AdaRound iterations per block for the adaround_block rows (default: method.adaround's)")
    parser.add_argument("--drop-prob", type=float, default=None,
                        help="QDrop probability for the adaround_block rows (default: method.adaround's)")
    parser.add_argument("--suffix", default="", help="appended to the results file names")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from qframe.utils.env import environment, machine_text
    from qframe.utils.io import atomic_write_json, atomic_write_text

    setups = [s for s in args.setups.split(",") if s]
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        parser.error(f"unknown setup {bad[0]!r}; valid: {', '.join(SETUPS)}")
    presets = args.presets.split(",") if args.presets else None
    command = "python benchmarks/ptq_remedies.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name in setups:
        def write(result, name=name):
            env = environment()
            m, v = env["machine"], env["versions"]
            load = os.getloadavg()
            result.update(command=command.strip(), torch_threads=torch.get_num_threads(),
                          load_average=[round(x, 2) for x in load], **env)
            status = "" if result["complete"] else " (partial: the run stopped before the rows not listed)"
            text = (f"# PTQ remedies: {name}{status}\n\n{table(result)}\n\nFP32 training (or loading) took "
                    f"{result['train_s']} s. Quantize s: wall-clock seconds of calibration, mixed-precision search "
                    f"and remedies, {result['torch_threads']} torch threads, load average {load[0]:.1f} (shared "
                    f"machine).\n\nMachine: {machine_text(m, m['arch'])}; Python {v['python']}, "
                    f"torch {v['torch']}, qframe {v['qframe']}; {env['date']}.\nCommand: `{command.strip()}`\n")
            if not args.no_write:
                RESULTS.mkdir(parents=True, exist_ok=True)
                atomic_write_text(text, RESULTS / f"ptq_remedies_{name}{args.suffix}.md")
                atomic_write_json(result, RESULTS / f"ptq_remedies_{name}{args.suffix}.json")
            return text

        result = run_setup(name, args.orl_root, Path(args.cache), presets, on_row=write,
                           variants=args.variants.split(",") if args.variants else None,
                           block_iterations=args.block_iterations, drop_prob=args.drop_prob)
        print(write(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
