"""What qframe's Triton kernels need from a GPU, compiled here without one (qframe.kernels.triton.aot).

For each target (Jetson Orin sm_87, H100 / H200 sm_90) and each product of the GPU GEMM sweep
(benchmarks/gemm.py: 4096^3, M = 1 against 4096 x 4096 and 8192 x 8192 weights, each zoo model's
heaviest layer at M = 2048), every tile the launcher would compile (all that autotuning tries, or
the one heuristic tile) is compiled by triton's NVIDIA backend. The table gives per product: tiles
compiled, how many fit the target's shared memory, how many spill registers, which tensor-core
instructions they use, and the largest register and shared-memory use.

    python benchmarks/triton_compile.py [--archs sm_87 sm_90] [--tag NAME] [--no-write]

Writes benchmarks/results/triton_compile[_<tag>].{md,json} with machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def problems():
    """(label, op, M, N, K, group size, w4a16 activation dtype) of the GPU GEMM sweep, plus group sizes that
    do not tile BLOCK_K and float32 activations (the float32 FMA dot)."""
    from benchmarks.gemm import zoo_shapes

    out = []
    for op, gs in (("int8_mm", 0), ("w4a8_mm", 128), ("w4a16_mm", 128), ("w4a8_mm", 48), ("w4a16_mm", 48)):
        out.append(("4096^3", op, 4096, 4096, 4096, gs, "bf16"))
    out.append(("4096^3", "w4a16_mm", 4096, 4096, 4096, 0, "fp32"))  # float32 activations: the FMA dot
    for n in (4096, 8192):
        out.append((f"M=1, {n}x{n}", "w4a16_mm", 1, n, n, 128, "bf16"))
        out.append((f"M=1, {n}x{n}", "w4a8_mm", 1, n, n, 128, "bf16"))
    heaviest = {}
    for s in zoo_shapes():
        model = s.label.split()[0]
        if model not in heaviest or s.k * s.n > heaviest[model].k * heaviest[model].n:
            heaviest[model] = s
    for s in heaviest.values():
        for op, gs in (("int8_mm", 0), ("w4a8_mm", 0), ("w4a16_mm", 0)):
            out.append((f"{s.label} M=2048", op, 2048, s.n, s.k, gs, "bf16"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["sm_87", "sm_90"])
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import triton

    from qframe.kernels.triton import aot
    from qframe.utils.env import environment, machine_text

    ok, why = aot.available()
    if not ok:
        print(f"triton_compile: {why}", file=sys.stderr)
        return 2
    rows, tiles = [], []
    for arch in args.archs:
        for label, op, m, n, k, gs, dtype in problems():
            start = time.perf_counter()
            try:
                dt = getattr(torch, DTYPES[dtype])
                compiled = aot.compile_gemm(op, m, n, k, arch, group_size=gs, dtype=dt)
                error = ""
            except Exception as e:  # a tile that does not compile is a finding, not a crash of the sweep
                compiled, error = [], f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
            seconds = time.perf_counter() - start
            tiles += [{**dataclasses.asdict(c), "tile": c.tile(), "fits": c.fits, "problem": label} for c in compiled]
            cores = collections.Counter(c.tensor_cores for c in compiled)
            name = op + (f" g{gs}" if gs else "") + (f" {dtype}" if op == "w4a16_mm" else "")
            rows.append({
                "arch": arch, "problem": label, "op": name, "m": m, "n": n, "k": k,
                "tiles": len(compiled), "fit": sum(c.fits for c in compiled),
                "spill": sum(bool(c.stack) for c in compiled),
                "cores": ", ".join(f"{kind} {count}" for kind, count in cores.items()),
                "max_regs": max((c.registers or 0 for c in compiled), default=0),
                "max_shared": max((c.shared for c in compiled), default=0),
                "error": error, "seconds": round(seconds, 1),
            })
            r = rows[-1]
            print(f"{arch} {label:28s} {r['op']:20s} tiles {r['tiles']:2d} fit {r['fit']:2d} spill {r['spill']:2d} "
                  f"[{r['cores']}] regs<={r['max_regs']} shared<={r['max_shared']} {error} ({seconds:.1f} s)",
                  flush=True)

    env = environment()
    env["versions"]["triton"] = triton.__version__
    failed = sum(bool(r["error"]) for r in rows)
    lines = [
        "# Triton kernels compiled for NVIDIA targets without a GPU",
        "",
        "Command: `" + " ".join(["python benchmarks/triton_compile.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        f"Machine: {machine_text(env['machine'], 'no GPU')}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}. Date: {env['date']}.",
        "",
        "Each row: every tile the launcher compiles for that product (autotuned products: all tiles autotuning "
        "tries; small ones: the heuristic tile). `fit`: shared memory within the target's per-block limit "
        f"({', '.join(f'{a} {aot.SHARED_LIMIT[a]:,} B' for a in args.archs)}); autotuning skips a tile that does "
        "not fit. `spill`: tiles with stack bytes (registers spilled to local memory). `cores`: tensor-core "
        "instructions of the inner product (wgmma on Hopper, mma.sync before it; none: float32 FMA).",
        "",
        "| target | product | op | tiles | fit | spill | tensor cores | max regs | max shared B | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['arch']} | {r['problem']} | {r['op']} | {r['tiles']} | {r['fit']} | {r['spill']} | {r['cores']} | "
              f"{r['max_regs']} | {r['max_shared']:,} | {r['error']} |" for r in rows]
    lines += ["", f"Products that failed to compile: {failed} of {len(rows)}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from qframe.utils.io import atomic_write_json, atomic_write_text

        stem = "triton_compile" + (f"_{args.tag}" if args.tag else "")
        results = ROOT / "benchmarks" / "results"
        atomic_write_text(text, results / f"{stem}.md")
        atomic_write_json({"environment": env, "rows": rows, "tiles": tiles}, results / f"{stem}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
