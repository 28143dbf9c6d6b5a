"""Measure the CPU int8 dispatch table: per ISA and shape class, qframe's kernel, torch._int_mm and the
float GEMM against fp32 torch.mm.

    python benchmarks/cpu_int8_table.py                 # the detected ISA's row and AVX2's; writes the table
    python benchmarks/cpu_int8_table.py --isas avx2     # one row
    python benchmarks/cpu_int8_table.py --json t.json   # a table for QFRAME_INT8_TABLE, nothing else written

Each ISA row runs in its own process with ``QFRAME_CPU_ISA`` set (qframe's kernel for that ISA) and,
for ``avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2`` (torch's oneDNN int8 code
and its own kernels capped at AVX2), so an AVX-512 machine measures how an AVX2-only one is served.
Each implementation's int32 product is also checked against int64 on codes that include -128; one that
differs is marked inexact and never chosen. Times are medians over interleaved rounds of ``int8_mm`` (int8 activations and weights, float32
scales and bias, float32 output) per implementation, and ``fp32_mm`` = ``torch.mm`` on float32
operands already in memory. Writes qframe/kernels/cpu/int8_table.py (the table the ``cpu`` backend
dispatches from) and benchmarks/results/cpu_int8_table.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLE_PY = ROOT / "qframe" / "kernels" / "cpu" / "int8_table.py"
# Shape classes (largest M) and the M each is measured at; (K, N) of compact CNN, ResNet-18 and
# MobileNetV2 layers (3x3 im2col and 1x1 convolutions, as convert runs them).
CLASSES = ((1, 1), (8, 8), (64, 64), (512, 512), (None, 2048))
# Weight-size classes (largest K * N): small layers are dominated by call overhead, large by arithmetic.
SIZES = ((65536, ((576, 64), (1280, 10))), (None, ((1152, 128), (2304, 256), (160, 960))))
IMPLS = ("qframe", "torch_int_mm", "float", "fp32_mm")
ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
           "avx_vnni": {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "ATEN_CPU_CAPABILITY": "avx2"}}


def measure_row(rounds: int, threads: int) -> dict:
    """In a child process: times of every implementation for every class and shape, at the forced ISA."""
    import torch

    from qframe.kernels import cpu
    from qframe.kernels.cpu import isa, select

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ops, reason = cpu._load()
    code = isa.KERNEL_CODE[isa.current()]
    classes = []
    for (m_max, m), (kn_max, size_shapes) in ((c, z) for c in CLASSES for z in SIZES):
        shapes = []
        for k, n in size_shapes:
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            a_scale, w_scale, bias = torch.rand(m) + 0.5, torch.rand(n) + 0.5, torch.randn(n)
            af, wf = a.float(), w.float()
            fns = {"float": lambda: select.float_int8_mm(a, a_scale, w, w_scale, bias),
                   "fp32_mm": lambda: torch.mm(af, wf.t())}
            if ops is not None:
                fns["qframe"] = lambda: ops.int8_mm(a, a_scale, w, w_scale, bias, False, code)
            if hasattr(torch, "_int_mm"):
                def int_mm():
                    acc = torch._int_mm(a, w.t())
                    if ops is not None:
                        ops.int8_epilogue_(acc, a_scale, w_scale, bias)
                    return acc
                fns["torch_int_mm"] = int_mm
            times = {name: [] for name in fns}
            # exactness: each implementation's int32 product against int64, on codes that include -128
            ea, ew = a.clone(), w.clone()
            ea.view(-1)[:: 7] = -128
            ew.view(-1)[:: 5] = -128
            ref = (ea.long() @ ew.long().t()).int()
            exact = {"float": bool(torch.equal(select.float_int8_mm_i32(ea, ew), ref)), "fp32_mm": True}
            if ops is not None:
                exact["qframe"] = bool(torch.equal(ops.int8_mm_i32(ea, ew, False, code), ref))
            if hasattr(torch, "_int_mm"):
                exact["torch_int_mm"] = bool(torch.equal(torch._int_mm(ea, ew.t()), ref))
            for fn in fns.values():
                fn()
            budget = time.perf_counter() + 20.0  # a slow path (torch's scalar int8 fallback) gets fewer rounds
            for r in range(rounds):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
                if r >= 2 and time.perf_counter() > budget:
                    break
            shapes.append({"m": m, "k": k, "n": n, "ms": {nm: round(statistics.median(v), 5) for nm, v in times.items()},
                           "exact": exact})
        classes.append({"m_max": m_max, "kn_max": kn_max, "shapes": shapes})
    return {"isa": isa.current(), "kernel": {0: "portable C++", 1: "AVX2 u8 x s8 pairs", 2: "AVX-512 VNNI",
                                             3: "Arm dot product"}[code] if ops is not None else f"none ({reason})",
            "env": {k: os.environ[k] for k in ("QFRAME_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                    if k in os.environ},
            "classes": classes}


def machine() -> dict:
    import platform

    import torch

    from qframe.kernels.cpu import isa
    from qframe.utils.env import environment

    env = environment()
    wanted = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
              "asimddp", "i8mm", "sve")
    return {"date": env["date"], "cpu": env["machine"]["cpu"], "arch": platform.machine(),
            "cores": env["machine"]["cores"], "isa_detected": isa.detected(),
            "int8_flags": sorted(f for f in isa.cpu_flags() if f in wanted),
            "torch": torch.__version__, "python": platform.python_version()}


def markdown(table: dict) -> str:
    from qframe.kernels.cpu import select

    mc = table["machine"]
    lines = [
        "# CPU int8 dispatch table", "",
        f"Machine: {mc['cpu']} ({mc['arch']}, {mc['cores']} cores, {table['threads']} torch threads); "
        f"int8 ISA detected: {mc['isa_detected']}; flags: {', '.join(mc['int8_flags'])}.",
        f"Versions: torch {mc['torch']}, python {mc['python']}. Date: {mc['date']}.",
        f"Command: `{table['command']}`", "",
        "Median ms of `int8_mm` (int8 x int8, float32 scales and bias, float32 output) per implementation; "
        "`fp32_mm` is `torch.mm` on float32 operands (the float GEMM being replaced); `(Nx)` = fp32_mm / column "
        "(higher is faster). `qframe` = the extension's kernel for the row's ISA; `float` = the float GEMM on the "
        "codes (what runs where no int8 path wins). Rows other than the detected ISA are forced on this machine "
        "(QFRAME_CPU_ISA, and torch/oneDNN capped by the environment shown). **inexact**: the implementation's int32 "
        "product differed from the int64 one on that shape (codes including -128); it is never chosen. `auto picks`: what the `cpu` backend "
        "runs for the class (never an implementation slower than fp32_mm on any shape of the class here).", "",
    ]
    for isa_name, row in table["rows"].items():
        lines += [f"## {isa_name}: qframe kernel {row['kernel']}; environment {row['env'] or '-'}", "",
                  "| M (class) | K | N (K*N class) | fp32_mm ms | qframe ms | torch_int_mm ms | float ms | auto picks |",
                  "|---|---|---|---|---|---|---|---|"]
        for cls in row["classes"]:
            first = cls["shapes"][0]
            pick = select.ranked(row, first["m"], first["k"] * first["n"])[0]
            for s in cls["shapes"]:
                ms = s["ms"]

                def cell(name):
                    v = ms.get(name)
                    if v is None:
                        return "n/a"
                    wrong = "" if s.get("exact", {}).get(name, True) else " **inexact**"
                    return f"{v:.3f} ({ms['fp32_mm'] / v:.2f}x){wrong}"
                label = f"{s['m']} (<= {cls['m_max']})" if cls["m_max"] is not None else f"{s['m']} (larger)"
                size = f"<= {cls['kn_max']}" if cls.get("kn_max") is not None else "larger"
                lines.append(f"| {label} | {s['k']} | {s['n']} ({size}) | {ms['fp32_mm']:.3f} | {cell('qframe')} | "
                             f"{cell('torch_int_mm')} | {cell('float')} | {pick} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", nargs="+", default=None, help="ISA rows to measure (default: the detected ISA and avx2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write only this JSON table (for QFRAME_INT8_TABLE)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the results .md from the shipped table (after a rule change)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        sys.path.insert(0, str(ROOT))
        from qframe.kernels.cpu.int8_table import TABLE

        (RESULTS / "cpu_int8_table.md").write_text(markdown(TABLE))
        return 0
    if args.child:
        print(json.dumps(measure_row(args.rounds, args.threads)))
        return 0
    sys.path.insert(0, str(ROOT))
    from qframe.kernels.cpu import isa

    isas = args.isas or list(dict.fromkeys([isa.detected()] + [i for i in ("avx2",) if i in isa.supported()]))
    rows = {}
    for name in isas:
        env = {**os.environ, "QFRAME_CPU_ISA": name, **ISA_ENV.get(name, {}),
               "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        print(f"measuring ISA row {name} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    command = ("python benchmarks/cpu_int8_table.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    table = {"machine": machine(), "threads": args.threads, "command": command, "rows": rows}
    text = markdown(table)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
        return 0
    TABLE_PY.write_text(
        '"""The measured CPU int8 dispatch table (data; written by benchmarks/cpu_int8_table.py, do not edit).\n\n'
        "``rows[isa]['classes']``: shape classes by largest M, each with median ms per implementation on a few\n"
        "(K, N) shapes, and the machine the table was measured on. See qframe.kernels.cpu.select.\n"
        '"""\n\n'
        + table_source(table))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_int8_table.md").write_text(text)
    (RESULTS / "cpu_int8_table.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {TABLE_PY.relative_to(ROOT)} and benchmarks/results/cpu_int8_table.md/.json", file=sys.stderr)
    return 0


def table_source(table: dict) -> str:
    """``TABLE = {...}`` with one measured shape per line (pprint puts each number on its own line)."""
    lines = ["TABLE = {"] + [f"    {k!r}: {table[k]!r}," for k in table if k != "rows"] + ["    'rows': {"]
    for isa, row in table["rows"].items():
        lines += [f"        {isa!r}: {{"] + [f"            {k!r}: {v!r}," for k, v in row.items() if k != "classes"]
        lines.append("            'classes': [")
        for c in row["classes"]:
            head = "".join(f"{k!r}: {v!r}, " for k, v in c.items() if k != "shapes")
            lines += ["                {" + head + "'shapes': ["] + [f"                    {s!r}," for s in c["shapes"]]
            lines.append("                ]},")
        lines += ["            ],", "        },"]
    return "\n".join(lines + ["    },", "}"]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
