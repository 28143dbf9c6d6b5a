"""RCT against QAT at the same final bit widths: accuracy, training memory and estimated energy.

    python benchmarks/rct.py --name digits
    python benchmarks/rct.py --name orl_faces data=imagefolder data.root=../shared/data/orl_faces \
        data.channels=1 model=compact_cnn train.epochs=80 method.epochs=15

One run: FP32 training, PTQ and RCT (``method=rct``, the run ``python -m qframe method=rct``
makes), then QAT from the same FP32 model with every layer's weight bits set to the bits RCT
ended with (so both have the same final average bit width) and the same number of epochs.
Extra arguments are Hydra overrides. Writes benchmarks/results/rct_<name>.md / .json and the
bit-width plot rct_<name>_bits.png, with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from qframe.app import run
from qframe.config import register, to_config
from qframe.quant.recipe import LayerRule
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def tables(rct_run: dict, qat_run: dict) -> str:
    rct = rct_run["rct"]
    rows = {(r["method"], r["precision"]): r for r in rct_run["results"]}
    fp32 = next(r for r in rct_run["results"] if r["method"] == "fp32")
    ptq = next(r for r in rct_run["results"] if r["method"] == "ptq")
    rct_row = next(r for r in rct_run["results"] if r["method"] == "rct")
    qat_row = next(r for r in qat_run["results"] if r["method"] == "qat")
    del rows
    bits = rct["average_bits"]
    lines = [
        "| method | average weight bits | test acc % | Δ vs FP32 | Δ RCT − QAT |",
        "|---|---|---|---|---|",
        f"| fp32 | 32 | {fp32['accuracy']:.2f} | 0.00 | |",
        f"| ptq {ptq['precision']} | 8 | {ptq['accuracy']:.2f} | {ptq['delta']:+.2f} | |",
        f"| qat (per-layer bits = RCT's final bits) | {bits:.2f} | {qat_row['accuracy']:.2f} | {qat_row['delta']:+.2f} | |",
        f"| rct | {bits:.2f} | {rct_row['accuracy']:.2f} | {rct_row['delta']:+.2f} | "
        f"{rct_row['accuracy'] - qat_row['accuracy']:+.2f} |",
        "",
        "Training memory, measured from the tensors that exist after a training step (MiB):",
        "",
        "| training | parameters | optimizer state | params + state | vs QAT | gradients held | step peak RSS growth |",
        "|---|---|---|---|---|---|---|",
    ]
    mem = rct["memory"]
    for key in ("fp32", "qat", "rct"):
        m = mem[key]
        lines.append(f"| {key} | {_mib(m['parameter_bytes'])} | {_mib(m['optimizer_state_bytes'])} | "
                     f"{_mib(m['total_bytes'])} | {m['total_bytes'] / mem['qat']['total_bytes']:.1%} | "
                     f"{_mib(m['gradient_bytes'])} | {_mib(m['step_peak_delta_bytes'])} |")
    e = rct["energy_estimate"]
    lines += [
        "",
        f"Energy per training step (batch {e['batch']}), **estimate** ({e['fp32']['source']}):",
        "",
        "| training | GEMM µJ | parameter traffic µJ | total µJ |",
        "|---|---|---|---|",
        f"| fp32 | {e['fp32']['gemm_uj']:.1f} | {e['fp32']['param_movement_uj']:.1f} | {e['fp32']['total_uj']:.1f} |",
        f"| rct | {e['rct']['gemm_uj']:.1f} | {e['rct']['param_movement_uj']:.1f} | {e['rct']['total_uj']:.1f} |",
        "",
        f"Estimated GEMM energy saving of RCT against FP32: **{e['gemm_saving']:.1%}** "
        f"(total with parameter traffic {e['total_saving']:.1%}).",
        f"Bit widths: {rct['bit_changes']} controller changes; final bits per layer in the JSON; "
        f"settings {rct['config']}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="label of the results files")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=compact_cnn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register()
    overrides = ["method=rct", *args.overrides]
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        rct_cfg = compose(config_name="config", overrides=overrides)
        qat_cfg = compose(config_name="config", overrides=[*overrides, "method=qat"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rct_run = run(to_config(rct_cfg), tmp / "rct", OmegaConf.to_container(rct_cfg, resolve=True))
        bits = rct_run["rct"]["final_bits"]
        cfg = to_config(qat_cfg)
        rct_method = to_config(rct_cfg).method
        cfg.method = dataclasses.replace(cfg.method, epochs=rct_method.epochs, compare=[])
        cfg.train = dataclasses.replace(cfg.train, checkpoint=str(tmp / "rct" / "fp32.pt"))
        cfg.quant = dataclasses.replace(cfg.quant, name=f"{cfg.quant.name}_rct_bits",
                                        rules=[LayerRule(pattern=n, weight_bits=b) for n, b in bits.items()])
        qat_run = run(cfg, tmp / "qat")
        plot = tmp / "rct" / "rct_bits.png"
        if plot.is_file():
            RESULTS.mkdir(exist_ok=True)
            shutil.copyfile(plot, RESULTS / f"rct_{args.name}_bits.png")
    command = "python benchmarks/rct.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = rct_run["machine"]
    footer = (f"\n\nMachine: {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads); "
              f"torch {rct_run['versions']['torch']}; {rct_run['date']}. Data: {rct_run['data']['name']} "
              f"({rct_run['data']['test']} test images), model {rct_run['model']['name']}.\n"
              f"Command: `{command}`\nBit-width plot: rct_{args.name}_bits.png\n")
    text = tables(rct_run, qat_run) + footer
    print(text)
    atomic_write_text(f"# RCT against QAT: {args.name}\n\n" + text, RESULTS / f"rct_{args.name}.md")
    atomic_write_json({"rct_run": rct_run, "qat_run": qat_run, "command": command}, RESULTS / f"rct_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
