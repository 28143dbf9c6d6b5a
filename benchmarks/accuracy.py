"""FP32 against its quantized versions (PTQ, QAT) on one data set, as a results table.

    python benchmarks/accuracy.py --name digits
    python benchmarks/accuracy.py --name orl_faces data=imagefolder data.root=../shared/data/orl_faces
    python benchmarks/accuracy.py --name orl_qat method=qat "method.compare=[w4a8,w4a4]" ...

Extra arguments are Hydra overrides of qframe's config; the run is the one `python -m qframe`
makes. Writes benchmarks/results/accuracy_<name>.md and .json with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from qframe.app import run
from qframe.config import register, to_config
from qframe.report import run_table
from qframe.utils.env import machine_text
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="label of the results files")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        cfg = compose(config_name="config", overrides=args.overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = run(to_config(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True))
    metrics["command"] = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = run_table(metrics)
    env = metrics["machine"]
    footer = (f"\n\nMachine: {machine_text(env, str(env['torch_threads']) + ' torch threads')}; "
              f"torch {metrics['versions']['torch']}; {metrics['date']}.\nCommand: `{metrics['command']}`\n")
    print(table + footer)
    atomic_write_text(f"# Accuracy: {args.name}\n\n" + table + footer, RESULTS / f"accuracy_{args.name}.md")
    atomic_write_json(metrics, RESULTS / f"accuracy_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
