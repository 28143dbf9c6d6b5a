"""RCT against QAT with the same optimizer: accuracy, bit widths, training memory and estimated energy.

    python benchmarks/rct.py --name digits +experiment=rct_orin
    python benchmarks/rct.py --name digits_scratch +experiment=rct_orin_scratch
    python benchmarks/rct.py --name orl_faces +experiment=rct_orin data=imagefolder \
        data.root=../shared/data/orl_faces data.channels=1

One run of the pipeline with ``method=rct`` (what ``python -m qframe method=rct`` does): FP32
training, PTQ, 8-bit QAT with RCT's optimizer (SGD with momentum), learning rate, epochs and
starting point (``method.rct.compare_qat``), and RCT. Memory is measured from tensors and the
allocator for FP32 and QAT with SGD + momentum and with AdamW, and for RCT at its final bit widths
(:func:`qframe.methods.rct.report.compare_training_memory`). Extra arguments are Hydra overrides.
Writes benchmarks/results/rct_<name>.md / .json, the bit-width plot rct_<name>_bits.png and the
controller's statistic rct_<name>_statistic.png, with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from qframe.app import run
from qframe.config import register, to_config
from qframe.utils.env import machine_text
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def tables(rct_run: dict) -> str:
    rct = rct_run["rct"]
    fp32 = next(r for r in rct_run["results"] if r["method"] == "fp32")
    ptq = next(r for r in rct_run["results"] if r["method"] == "ptq")
    rct_row = next(r for r in rct_run["results"] if r["method"] == "rct")
    qat_row = next(r for r in rct_run["results"] if r["method"] == "qat")
    bits = rct["average_bits"]
    lines = [
        "| method | average weight bits | test acc % | Δ vs FP32 | Δ RCT − QAT |",
        "|---|---|---|---|---|",
        f"| fp32 | 32 | {fp32['accuracy']:.2f} | 0.00 | |",
        f"| ptq {ptq['precision']} | 8 | {ptq['accuracy']:.2f} | {ptq['delta']:+.2f} | |",
        f"| qat 8-bit, SGD + momentum (RCT's optimizer, lr and epochs) | 8.00 | {qat_row['accuracy']:.2f} | "
        f"{qat_row['delta']:+.2f} | |",
        f"| rct (integer GEMMs) | {bits:.2f} | {rct_row['accuracy']:.2f} | {rct_row['delta']:+.2f} | "
        f"{rct_row['accuracy'] - qat_row['accuracy']:+.2f} |",
        "",
        "Training memory (MiB): parameters and optimizer state summed over the tensors that exist after a step; "
        "the step's peak read from the allocator during one step (method below):",
        "",
        "| training | parameters | optimizer state | params + state | vs QAT same optimizer | step peak above state "
        "| step peak total | vs QAT same optimizer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mem = rct["memory"]
    for key in ("fp32_sgd", "qat_sgd", "rct", "fp32_adamw", "qat_adamw"):
        m = mem[key]
        ref = mem["qat_adamw" if key.endswith("adamw") else "qat_sgd"]
        peak = m.get("step_peak_bytes")
        peaks = "n/a | n/a | n/a" if peak is None else \
            f"{_mib(m['step_peak_delta_bytes'])} | {_mib(peak)} | {peak / ref['step_peak_bytes']:.1%}"
        lines.append(f"| {key} | {_mib(m['parameter_bytes'])} | {_mib(m['optimizer_state_bytes'])} | "
                     f"{_mib(m['total_bytes'])} | {m['total_bytes'] / ref['total_bytes']:.1%} | {peaks} |")
    e = rct["energy_estimate"]
    lines += [
        "",
        f"Step peak measured by: {mem['rct'].get('step_peak_method')}. RCT parameter + optimizer bytes against QAT "
        f"with the same optimizer: **{mem['ratio_vs_qat_same_optimizer']:.1%}**; step peak: "
        f"**{mem.get('peak_ratio_vs_qat_same_optimizer', float('nan')):.1%}**.",
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
        f"Bit widths: {rct['bit_changes']} controller changes over {rct['steps']} steps; final bits per layer "
        f"{_bit_counts(rct['final_bits'])}; settings {rct['config']}.",
    ]
    return "\n".join(lines)


def _bit_counts(bits: dict) -> str:
    counts: dict = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{n} layers at {b} bits" for b, n in sorted(counts.items()))


def plot_statistic(rct: dict, path: Path) -> Path | None:
    """The controller's statistic G per layer at every decision, with the two thresholds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = rct["history_steps"][1:]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in rct["statistic"].items():
        if values:
            ax.plot(steps[:len(values)], values, marker=".", label=f"{name} (ends at {rct['final_bits'][name]} bits)")
    for key, style in (("underflow_below", ":"), ("overflow_above", "--")):
        ax.axhline(rct["config"][key], color="k", linestyle=style, label=key)
    ax.set(yscale="log", xlabel="training step", ylabel="G: mean update (quantization steps)",
           title="RCT controller statistic per layer")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rct_run = run(to_config(rct_cfg), tmp / "rct", OmegaConf.to_container(rct_cfg, resolve=True))
        if not any(r["method"] == "qat" for r in rct_run["results"]):
            raise SystemExit("the run has no qat row: keep method.rct.compare_qat=true")
        plot = tmp / "rct" / "rct_bits.png"
        if plot.is_file():
            RESULTS.mkdir(exist_ok=True)
            shutil.copyfile(plot, RESULTS / f"rct_{args.name}_bits.png")
    command = "python benchmarks/rct.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = rct_run["machine"]
    footer = (f"\n\nMachine: {machine_text(env, str(env['torch_threads']) + ' torch threads')}; "
              f"torch {rct_run['versions']['torch']}; {rct_run['date']}. Data: {rct_run['data']['name']} "
              f"({rct_run['data']['test']} test images), model {rct_run['model']['name']}.\n"
              f"Command: `{command}`\nBit-width plot: rct_{args.name}_bits.png; controller statistic: "
              f"rct_{args.name}_statistic.png\n")
    plot_statistic(rct_run["rct"], RESULTS / f"rct_{args.name}_statistic.png")
    text = tables(rct_run) + footer
    print(text)
    atomic_write_text(f"# RCT against QAT: {args.name}\n\n" + text, RESULTS / f"rct_{args.name}.md")
    atomic_write_json({"rct_run": rct_run, "command": command}, RESULTS / f"rct_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
