"""Where an INT8 ONNX gains or loses against FP32 in onnxruntime (CPU): kernel time per block.

    python benchmarks/onnx_speed.py --name digits_mobilenet_v2 --models mobilenet_v2 --keep runs/onnx
    python benchmarks/onnx_layers.py runs/onnx/mobilenet_v2/qat_w8a8 --name mobilenet_v2_qat_w8a8

The folder holds the files an export stage writes: ``model_fp32.onnx`` and the INT8 file, the standard
form ``model_<label>.onnx`` (or name them with ``--fp32`` / ``--int8``, e.g. the onnxruntime form
``model_<label>_onnxruntime.onnx``). Both run under
onnxruntime's profiler (:func:`qframe.export.ort.profile_onnx`, 2 intra-op threads,
ORT_ENABLE_ALL); each node's kernel time is attributed to the PyTorch module it came from
(:func:`qframe.export.qdq.module_path`, cut to ``--depth`` names: ``features.2``, ``layer1.0``),
nodes with no module (layout Transposes, NCHWc reorders) to their op type. The wall-clock latency of
both files, timed side by side without the profiler, shows what onnxruntime spends between kernels.
Writes benchmarks/results/onnx_layers_<name>.md and .json with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NO_BLOCK = {"ms": 0.0, "ops": collections.Counter()}


def by_block(profile: dict[str, dict], depth: int) -> dict[str, dict]:
    """Kernel milliseconds and op counts per module prefix of ``depth`` names, in execution order."""
    from qframe.export.qdq import module_path

    blocks: dict[str, dict] = {}
    for node, t in profile.items():
        path = module_path(node)
        key = ".".join(path.split(".")[:depth]) if path else f"({t['op']})"
        block = blocks.setdefault(key, {"ms": 0.0, "ops": collections.Counter()})
        block["ms"] += t["median_ms"]
        block["ops"][t["op"]] += 1
    return blocks


def _ops(counter: collections.Counter) -> str:
    return ", ".join(f"{n} {op}" for op, n in counter.most_common()) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder with model_fp32.onnx and one standard-form model_*.onnx")
    parser.add_argument("--name", required=True, help="label of the results files")
    parser.add_argument("--fp32", type=Path, default=None, help="FP32 ONNX (default: FOLDER/model_fp32.onnx)")
    parser.add_argument("--int8", type=Path, default=None, help="INT8 ONNX (default: the standard-form FOLDER/model_*.onnx)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=100, help="profiled runs per file (after 5 warm-up runs), "
                        "in 10 rounds taken in turns with the other file")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--depth", type=int, default=2, help="module names kept for a block (features.2: 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import onnx
    import onnxruntime

    from qframe.errors import QFrameError
    from qframe.export.ort import paired_speedup, profile_onnx, time_onnx
    from qframe.utils.env import environment, machine_text
    from qframe.utils.io import atomic_write_json, atomic_write_text

    fp32 = args.fp32 or args.folder / "model_fp32.onnx"
    int8 = args.int8
    if int8 is None:
        found = sorted(p for p in args.folder.glob("model_*.onnx")
                       if p.name != "model_fp32.onnx" and not p.name.endswith("_onnxruntime.onnx"))
        if len(found) != 1:
            raise QFrameError(f"{args.folder}: expected one standard-form model_*.onnx, found {len(found)}; "
                              "name the INT8 file with --int8")
        int8 = found[0]
    for path in (fp32, int8):
        if not path.is_file():
            raise QFrameError(f"ONNX file {path} does not exist")
    dims = onnx.load(str(fp32), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    input_shape = tuple(d.dim_value for d in dims[1:])

    files = {"fp32": fp32, "int8": int8}
    profiles = profile_onnx(files, input_shape, args.batch, threads=args.threads, rounds=10,
                            runs=max(1, args.runs // 10))
    blocks = {form: by_block(p, args.depth) for form, p in profiles.items()}
    wall = time_onnx(files, input_shape, args.batch, threads=args.threads, rounds=10, runs=10)

    order = list(dict.fromkeys([*blocks["int8"], *blocks["fp32"]]))
    lines = ["| block | FP32 kernels ms | INT8 kernels ms | INT8 speed-up | INT8 ops | FP32 ops |",
             "|---|---|---|---|---|---|"]
    rows = []
    for key in order:
        f, i = blocks["fp32"].get(key, NO_BLOCK), blocks["int8"].get(key, NO_BLOCK)
        rows.append({"block": key, "fp32_ms": f["ms"], "int8_ms": i["ms"], "fp32_ops": dict(f["ops"]),
                     "int8_ops": dict(i["ops"])})
        up = f"{f['ms'] / i['ms']:.2f}x" if f["ms"] and i["ms"] else "-"
        lines.append(f"| {key} | {f['ms']:.3f} | {i['ms']:.3f} | {up} | {_ops(i['ops'])} | {_ops(f['ops'])} |")
    kernels = {form: sum(b["ms"] for b in blocks[form].values()) for form in blocks}
    nodes = {form: len(p) for form, p in profiles.items()}
    med = {form: wall[form]["median_ms"] for form in wall}
    lines.append(f"| **sum of kernels** | {kernels['fp32']:.3f} | {kernels['int8']:.3f} | "
                 f"{kernels['fp32'] / kernels['int8']:.2f}x | {nodes['int8']} nodes | {nodes['fp32']} nodes |")
    lines.append(f"| **wall clock (no profiler)** | {med['fp32']:.3f} | {med['int8']:.3f} | "
                 f"{paired_speedup(wall['fp32'], wall['int8']):.2f}x | | |")
    table = "\n".join(lines)

    env = environment()
    env["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    m = env["machine"]
    command = "python benchmarks/onnx_layers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (
        f"\n\nFP32: `{fp32.name}`, INT8: `{int8.name}`; batch {args.batch}, input {input_shape}. Kernel ms: the "
        f"median over {args.runs} profiled runs (the two files in turns, 10 rounds) of each node's kernel time, "
        f"summed per block (the PyTorch module cut to {args.depth} names; a node with no module under its op "
        "type). The profiler adds its own cost to each node, so compare blocks with each other and the two "
        "files with each other, not with the wall clock. "
        "Wall clock: median of 100 calls per file without the profiler, the two side by side (speed-up: median of "
        f"the per-round ratios); onnxruntime CPU, {args.threads} intra-op threads, ORT_ENABLE_ALL.\n"
        f"Machine: {machine_text(m, 'shared with other jobs')}; onnx {onnx.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; {env['date']}.\nCommand: `{command}`\n")
    print(table + footer)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f"# INT8 against FP32 per block in onnxruntime: {args.name}\n\n" + table + footer,
                      RESULTS / f"onnx_layers_{args.name}.md")
    atomic_write_json({"blocks": rows, "kernel_sum_ms": kernels, "nodes": nodes, "wall": wall, "batch": args.batch,
                       "input_shape": list(input_shape), "threads": args.threads, "runs": args.runs,
                       "fp32": fp32.name, "int8": int8.name, "command": command, **env},
                      RESULTS / f"onnx_layers_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
