"""W8A8 PTQ calibration for CPU deployment: which activation observer, with or without bias correction,
keeps top-1 closest to FP32.

    python benchmarks/ptq_calibration.py                     # zoo models, every observer, 3 calibration draws
    python benchmarks/ptq_calibration.py --keep runs/cpu_inference --models resnet18 mobilenet_v2

The models are those of benchmarks/cpu_inference.py (trained briefly on digits 32x32, the same seeds;
``--keep`` shares the trained weights with it). Each is quantized with the w8a8 preset (per-channel
minmax weights, per-tensor activations) and each activation observer, with and without bias correction,
on 8 calibration batches of 64 drawn with ``--draws`` different seeds. Each cell is the top-1 agreement of
the fake-quant model with the FP32 model on the held-out images (validation and test splits), per draw
and their mean; the last rows average over the models. This is what chose the calibration of
``+experiment=ptq_cpu``. Writes benchmarks/results/ptq_calibration[_<tag>].{md,json} with machine,
versions, date and command.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OBSERVERS = ("percentile", "minmax", "ema", "mse", "entropy")
log = logging.getLogger("ptq_calibration")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "compact_cnn"])
    parser.add_argument("--observers", nargs="+", default=list(OBSERVERS), choices=OBSERVERS)
    parser.add_argument("--draws", type=int, default=3, help="calibration draws (seeds 0..N-1) per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default=None, help="folder of trained FP32 models shared with cpu_inference.py")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.WARNING)
    import torch

    import qframe
    from benchmarks.cpu_inference import EPOCHS, trained_model
    from qframe.utils.env import environment, machine_text

    torch.set_num_threads(args.threads)
    data = qframe.build_data("digits", image_size=32, channels=1, seed=0)
    images = torch.cat([data.val.tensors[0], data.test.tensors[0]])
    rows = []
    for name in args.models:
        model = trained_model(name, data, keep=args.keep)
        with torch.no_grad():
            ref = model(images).argmax(1)
        for observer, bias_correction in itertools.product(args.observers, (False, True)):
            agreement = []
            for seed in range(args.draws):
                fake = qframe.ptq(model, qframe.preset("w8a8", input={"observer": observer}),
                                  data.loader("train", 64, shuffle=True, seed=seed), num_batches=8,
                                  bias_correction=bias_correction)
                with torch.no_grad():
                    agreement.append((fake(images).argmax(1) == ref).double().mean().item() * 100)
            rows.append({"model": name, "observer": observer, "bias_correction": bias_correction,
                         "agreement_fp32": agreement, "mean": sum(agreement) / len(agreement)})
            log.info("%-13s %-10s bias correction %-5s %s  mean %.2f", name, observer, bias_correction,
                     " ".join(f"{a:6.2f}" for a in agreement), rows[-1]["mean"])
    settings = [(o, bc) for o in args.observers for bc in (False, True)]
    means = {s: sum(r["mean"] for r in rows if (r["observer"], r["bias_correction"]) == s) / len(args.models)
             for s in settings}
    best = max(means.values())
    lines = ["| model | activation observer | bias correction | agreement with FP32 % per draw | mean % |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['observer']} | {'yes' if r['bias_correction'] else 'no'} | "
              f"{' / '.join(f'{a:.2f}' for a in r['agreement_fp32'])} | {r['mean']:.2f} |" for r in rows]
    lines += [f"| **mean of the models** | {o} | {'yes' if bc else 'no'} | | "
              f"{'**' if means[(o, bc)] == best else ''}{means[(o, bc)]:.2f}{'**' if means[(o, bc)] == best else ''} |"
              for o, bc in settings]
    env = environment()
    command = ("python benchmarks/ptq_calibration.py " + " ".join(argv)).strip()
    text = (
        "# W8A8 PTQ calibration for CPU deployment: top-1 agreement with FP32\n\n"
        f"Machine: {machine_text(env['machine'])}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}. Date: {env['date']}.\n"
        f"Command: `{command}`\n\n"
        f"Models trained briefly on digits 32x32 (epochs: {', '.join(f'{m} {EPOCHS[m]}' for m in args.models)}), "
        f"PTQ w8a8 (per-channel minmax weights) with each activation observer, 8 calibration batches of 64 drawn "
        f"with seeds 0..{args.draws - 1}; agreement of the fake-quant model's top-1 with FP32's on "
        f"{len(images)} held-out images (validation and test splits; one image = {100 / len(images):.2f} %).\n\n"
        + "\n".join(lines) + "\n")
    print("\n" + text)
    if not args.no_write:
        from qframe.utils.io import atomic_write_json, atomic_write_text

        suffix = f"_{args.tag}" if args.tag else ""
        atomic_write_text(text, RESULTS / f"ptq_calibration{suffix}.md")
        atomic_write_json({"command": command, **env, "draws": args.draws, "rows": rows,
                           "mean_of_models": {f"{o} bias_correction={bc}": v for (o, bc), v in means.items()}},
                          RESULTS / f"ptq_calibration{suffix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
