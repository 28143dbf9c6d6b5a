"""Low-bit GEMM speed: qframe's kernels against torch's fp32 / bf16 matmul and torch's own int8 / int4 ops.

    python benchmarks/gemm.py                      # full sweep; writes benchmarks/results/gemm_<device>.{md,json}
    python benchmarks/gemm.py --quick              # a few small shapes, a smoke test (prints only)
    python benchmarks/gemm.py --threads 2 --backends cpu reference --device cpu

Shapes: every M in 1, 16, 32, 256, 2048 against (K, N) pairs taken from the zoo models at the
digits resolution (for each of compact_cnn, mobilenet_v2, resnet18: its heaviest GEMM, as im2col
for a 3x3 convolution, its heaviest 1x1 convolution and its classifier) plus 4096 x 4096. Each
product is ``x [M, K] @ w[N, K].T``, nn.Linear's layout. Columns:

* ``fp32``, ``bf16``: ``torch.mm`` (the fp32 time is the base of every ratio);
* ``torch int8``: ``torch._int_mm`` (int32 out, no scaling), ``torch int4``: ``torch._weight_int4pack_mm_for_cpu``
  with bf16 activations on the CPU, ``torch._weight_int4pack_mm`` on CUDA (group size ``--group-size``);
* ``int8_mm``, ``w4a8_mm``, ``w4a16_mm`` through qframe's dispatch (``torch.ops.qframe``), once per
  backend in ``--backends``: int8 weights per channel; int4 weights packed with groups of
  ``--group-size`` along K (0: per channel); int8 activations quantized per row beforehand (every
  int8 column times the GEMM alone), bf16 activations for ``w4a16_mm``. The ``reference`` backend
  runs only where M * N * K <= 2**27.

On a GPU (``--device cuda``, the default where one is present) the sweep is the one that matters
there, kept small because Triton autotunes each new shape: M = N = K = 4096; M = 1 against
4096 x 4096 and 8192 x 8192 weights with a cold L2; each zoo model's heaviest GEMM at M = 2048.
Ratios there are against cuBLAS bf16 (``torch.mm`` on bf16 tensors), the float baseline a GPU
user has; ``fp32`` is still timed (IEEE float32, no TF32).

Timing: ``qframe.measure.timing.benchmark`` per candidate (CUDA events on a GPU); the candidates of one shape take turns
over three rounds (so a burst of load on a shared machine hits all of them), and the table gives
the median of all timed calls. Cold cache (the extra M = 1, 4096 x 4096 row): each call uses the
next of C copies of its weights, C chosen so that the other copies read between two uses of one
copy hold at least twice the last-level cache, so every call streams its weights from DRAM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

import qframe.kernels as qk
from qframe.measure.timing import benchmark, percentile
from qframe.utils.env import environment, machine_text
from qframe.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MS = (1, 16, 32, 256, 2048)
QUICK_MS = (1, 32)
BIG = (4096, 4096)
REFERENCE_MAX_MACS = 2**27
ROUNDS = 3
log = logging.getLogger("gemm")


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    label: str
    k: int
    n: int


def zoo_shapes(image_size: int = 32, channels: int = 1, num_classes: int = 10) -> list[Shape]:
    """(K, N) of real layers: per zoo model its heaviest GEMM, heaviest 1x1 convolution and classifier."""
    from torch import nn

    from qframe.models import build_model

    widths = {"mobilenet_v2": 0.5}  # as in conf/model/mobilenet_v2.yaml
    shapes: list[Shape] = []
    for name in ("compact_cnn", "mobilenet_v2", "resnet18"):
        model = build_model(name, num_classes, channels, image_size, width_mult=widths.get(name, 1.0))
        layers = []
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d) and mod.groups == 1:
                kh, kw = mod.kernel_size
                kind = "1x1" if (kh, kw) == (1, 1) else f"{kh}x{kw} im2col"
                layers.append((mod.in_channels * kh * kw, mod.out_channels, kind))
            elif isinstance(mod, nn.Linear):
                layers.append((mod.in_features, mod.out_features, "linear"))
        picks = [max(layers, key=lambda t: t[0] * t[1])]
        picks += [max((t for t in layers if t[2] == "1x1"), key=lambda t: t[0] * t[1], default=None)]
        picks += [next((t for t in reversed(layers) if t[2] == "linear"), None)]
        for pick in picks:
            if pick is not None and all((s.k, s.n) != pick[:2] for s in shapes):
                shapes.append(Shape(f"{name} {pick[2]}", pick[0], pick[1]))
    return shapes


def gpu_problems(device: torch.device, group_size: int) -> list["Problem"]:
    """The GPU sweep (see the module docstring)."""
    square = Shape("square", *BIG)
    problems = [Problem(square, 4096, device, group_size),
                Problem(square, 1, device, group_size, True),
                Problem(Shape("square", 8192, 8192), 1, device, group_size, True)]
    heaviest = {}
    for s in zoo_shapes():
        model = s.label.split()[0]
        if model not in heaviest or s.k * s.n > heaviest[model].k * heaviest[model].n:
            heaviest[model] = s
    return problems + [Problem(s, 2048, device, group_size) for s in heaviest.values()]


# ---------------------------------------------------------------------------------------------
# Problems and candidates


@dataclass
class Problem:
    """One product ``x [M, K] @ w [N, K].T`` with every input form a candidate needs, built lazily."""

    shape: Shape
    m: int
    device: torch.device
    group_size: int
    cold: bool = False

    @property
    def macs(self) -> int:
        return self.m * self.shape.n * self.shape.k

    @cached_property
    def x(self):
        return torch.randn(self.m, self.shape.k, device=self.device)

    @cached_property
    def w(self):
        return torch.randn(self.shape.n, self.shape.k, device=self.device) / math.sqrt(self.shape.k)

    @cached_property
    def xb(self):
        return self.x.bfloat16()

    @cached_property
    def a8(self):
        return qk.quantize_rows(self.x)

    @cached_property
    def w8(self):
        return qk.quantize_weight_int8(self.w)

    @cached_property
    def w4(self):
        return qk.quantize_weight_int4(self.w, self.group_size or None)


@dataclass
class Candidate:
    """A column: ``build(problem) -> (weights, call)``; ``call(weights)`` runs one product."""

    name: str
    build: Callable[[Problem], tuple]
    backend: Optional[str] = None  # qframe backend the column runs on (None: a torch op)
    only_small: bool = False


def _torch_int4_cpu(p: Problem):
    gs = p.group_size
    if gs not in (32, 64, 128, 256) or p.shape.k % gs or p.shape.n % 16:
        raise ValueError(f"needs group size 32..256 dividing K and N % 16 == 0 (K={p.shape.k}, N={p.shape.n}, gs={gs})")
    q = torch.randint(0, 16, (p.shape.n, p.shape.k), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = torch.rand(p.shape.k // gs, p.shape.n, 2).bfloat16()
    xb = p.xb
    return (packed, scales), lambda w: torch._weight_int4pack_mm_for_cpu(xb, w[0], gs, w[1])


def _torch_int4_cuda(p: Problem):
    gs, inner = p.group_size, 8
    if gs not in (32, 64, 128, 256) or p.shape.k % max(gs, inner * 16):
        raise ValueError(f"needs group size 32..256 and K % {inner * 16} == 0 (K={p.shape.k}, gs={gs})")
    q = torch.randint(0, 256, (p.shape.n, p.shape.k // 2), dtype=torch.uint8, device=p.device)
    packed = torch._convert_weight_to_int4pack(q, inner)
    scales = torch.rand(p.shape.k // gs, p.shape.n, 2, device=p.device).bfloat16()
    xb = p.xb
    return (packed, scales), lambda w: torch._weight_int4pack_mm(xb, w[0], gs, w[1])


def _torch_int8(p: Problem):
    a = p.a8[0]
    return (p.w8[0],), lambda w: torch._int_mm(a, w[0].t())  # the [K, N] view of the [N, K] weight


def candidates(device: torch.device, backends: list[str]) -> list[Candidate]:
    cands = [
        Candidate("fp32", lambda p: ((p.w,), lambda w: torch.mm(p.x, w[0].t()))),
        Candidate("bf16", lambda p: ((p.w.bfloat16(),), lambda w: torch.mm(p.xb, w[0].t()))),
        Candidate("torch int8", _torch_int8),
        Candidate("torch int4", _torch_int4_cuda if device.type == "cuda" else _torch_int4_cpu),
    ]
    for b in backends:
        small = b == "reference"

        def int8(p):
            a, s = p.a8
            return p.w8, lambda w: qk.int8_mm(a, s, w[0], w[1])

        def w4a8(p):
            a, s = p.a8
            return p.w4, lambda w: qk.w4a8_mm(a, s, w[0], w[1], p.group_size)

        def w4a16(p):
            xb = p.xb
            return p.w4, lambda w: qk.w4a16_mm(xb, w[0], w[1], p.group_size)

        cands += [Candidate(f"int8_mm [{b}]", int8, b, small), Candidate(f"w4a8_mm [{b}]", w4a8, b, small),
                  Candidate(f"w4a16_mm [{b}]", w4a16, b, small)]
    return cands


# ---------------------------------------------------------------------------------------------
# Measurement


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    return best or (64 << 20)


def copies_for_cold(weight_bytes: int, llc: int) -> int:
    """Copies to rotate so the weights read between two uses of one copy are >= 2x the cache."""
    return max(2, math.ceil(2 * llc / max(weight_bytes, 1)) + 1)


@dataclass
class Cell:
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    runs: int = 0
    copies: int = 1
    skipped: Optional[str] = None
    runs_per_round: int = 1
    samples: list = field(default_factory=list, repr=False)


def _prepare(c: Candidate, p: Problem, llc: int):
    """``(fn, copies)`` for a candidate on a problem, or a reason string when it cannot run."""
    if c.only_small and p.macs > REFERENCE_MAX_MACS:
        return f"reference runs only up to {REFERENCE_MAX_MACS} multiply-adds"
    try:
        weights, call = c.build(p)
        if c.backend is not None:
            with qk.use_backend(c.backend):
                call(weights)  # fails early (and clearly) when the backend cannot run here
        else:
            call(weights)
    except Exception as exc:  # an op that does not take this shape, a backend that cannot run
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    copies = 1
    if p.cold:
        copies = copies_for_cold(sum(t.numel() * t.element_size() for t in weights), llc)
        sets = [weights] + [tuple(t.clone() for t in weights) for _ in range(copies - 1)]
        turn = iter(range(1 << 62))
        return (lambda _: call(sets[next(turn) % copies])), copies
    return (lambda _: call(weights)), copies


def measure(p: Problem, cands: list[Candidate], llc: int, per_round_s: float) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    ready = {}
    for c in cands:
        prepared = _prepare(c, p, llc)
        if isinstance(prepared, str):
            cells[c.name] = Cell(skipped=prepared)
        else:
            ready[c.name] = (c, *prepared)
            cells[c.name] = Cell(copies=prepared[1])
    names = list(ready)
    for r in range(ROUNDS):
        for name in names[r % max(len(names), 1):] + names[: r % max(len(names), 1)]:
            c, fn, _ = ready[name]
            cell = cells[name]
            with qk.use_backend(c.backend or qk.get_backend()):
                if not cell.samples:  # size the rounds from one timed call
                    est = benchmark(fn, None, warmup=1, runs=1, device=p.device, batch_size=p.m).median_ms / 1e3
                    cell.runs_per_round = max(1, min(25, int(per_round_s / max(est, 1e-6))))
                res = benchmark(fn, None, warmup=1, runs=cell.runs_per_round, device=p.device, batch_size=p.m)
            cell.samples += res.samples_ms
    for name in names:
        cell = cells[name]
        cell.median_ms = statistics.median(cell.samples)
        cell.p90_ms = percentile(cell.samples, 90)
        cell.runs = len(cell.samples)
    return cells


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def table(rows: list[dict], names: list[str], base_name: str = "fp32") -> str:
    head = ["layer", "M", "K", "N", f"{base_name} ms"] + [f"{n} ms (x {base_name})" for n in names if n != base_name]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = row["cells"]
        base = cells[base_name]["median_ms"]
        out = [row["layer"] + (" (cold)" if row["cold"] else ""), str(row["m"]), str(row["k"]), str(row["n"]),
               _fmt_ms(base) if base else "n/a"]
        for n in names:
            if n == base_name:
                continue
            c = cells[n]
            if c["median_ms"] is None:
                out.append("n/a")
            else:
                ratio = f" ({base / c['median_ms']:.2f}x)" if base else ""
                out.append(_fmt_ms(c["median_ms"]) + ratio)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def _find(rows, k, n, m, cold):
    return next((r for r in rows if (r["k"], r["n"], r["m"], r["cold"]) == (k, n, m, cold)), None)


def _ms(row, name):
    return None if row is None else row["cells"].get(name, {}).get("median_ms")


def acceptance(rows: list[dict], primary: str) -> list[dict]:
    """The checks this benchmark exists to show, on the 4096 x 4096 rows, for backend ``primary``."""
    checks = []

    def add(what, value, target, passed):
        checks.append({"check": what, "value": value, "target": target,
                       "result": "n/a" if passed is None else ("PASS" if passed else "FAIL")})

    k, n = BIG
    for m in (m for m in MS if m >= 256):
        row = _find(rows, k, n, m, False)
        f, q = _ms(row, "fp32"), _ms(row, f"int8_mm [{primary}]")
        r = f / q if f and q else None
        add(f"W8A8 int8_mm [{primary}] vs fp32 torch.mm, M={m}, {k}x{n}", r, ">= 4x", None if r is None else r >= 4)
    cold = _find(rows, k, n, 1, True)
    f = _ms(cold, "fp32")
    int4 = {op: _ms(cold, f"{op} [{primary}]") for op in ("w4a8_mm", "w4a16_mm")}
    best = min((t for t in int4.values() if t), default=None)
    r = f / best if f and best else None
    add(f"packed int4 (best of w4a8_mm, w4a16_mm [{primary}]) vs fp32, M=1 cold, {k}x{n}", r, ">= 7x",
        None if r is None else r >= 7)
    for m, cold_row in ((1, True), (32, False)):
        row = _find(rows, k, n, m, cold_row)
        t4 = _ms(row, "torch int4")
        for op in ("w4a8_mm", "w4a16_mm"):
            q = _ms(row, f"{op} [{primary}]")
            r = t4 / q if t4 and q else None
            add(f"{op} [{primary}] vs torch int4 (bf16 activations), M={m}{' cold' if cold_row else ''}, {k}x{n}",
                r, "> 1x (informational)", None)
        best = min((t for t in (_ms(row, f"{op} [{primary}]") for op in ("w4a8_mm", "w4a16_mm")) if t), default=None)
        r = t4 / best if t4 and best else None
        add(f"packed int4 (best qframe op) faster than torch int4, M={m}{' cold' if cold_row else ''}, {k}x{n}",
            r, "> 1x", None if r is None else r > 1)
    return checks


def gpu_acceptance(rows: list[dict], backends: list[str]) -> list[dict]:
    """The GPU checks: int8 GEMM against cuBLAS bf16 at 4096^3, int4 weight-only GEMV against bf16 at M = 1."""
    checks = []

    def add(what, value, target, passed):
        checks.append({"check": what, "value": value, "target": target,
                       "result": "n/a" if passed is None else ("PASS" if passed else "FAIL")})

    big = _find(rows, 4096, 4096, 4096, False)
    bf16 = _ms(big, "bf16")
    for name in [f"int8_mm [{b}]" for b in backends] + ["torch int8"]:
        t = _ms(big, name)
        r = bf16 / t if bf16 and t else None
        target = ">= 1.6x" if name == "int8_mm [triton]" else "(informational)"
        add(f"W8A8 {name} vs cuBLAS bf16, 4096^3", r, target, None if r is None or "informational" in target else r >= 1.6)
    for k in (4096, 8192):
        row = _find(rows, k, k, 1, True)
        bf16 = _ms(row, "bf16")
        for name in [f"{op} [{b}]" for op in ("w4a16_mm", "w4a8_mm") for b in backends] + ["torch int4"]:
            t = _ms(row, name)
            r = bf16 / t if bf16 and t else None
            gated = k == 8192 and name.startswith("w4a16_mm")
            add(f"{name} vs cuBLAS bf16, M=1 cold, {k}x{k}", r, ">= 3x" if gated else "(informational)",
                None if r is None or not gated else r >= 3)
    return checks


def acceptance_text(checks: list[dict]) -> str:
    lines = ["| check | ratio | target | result |", "|---|---|---|---|"]
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}x"
        lines.append(f"| {c['check']} | {value} | {c['target']} | {c['result']} |")
    return "\n".join(lines)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes (smoke test); prints only")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="qframe backends to time (default: every available one of the device's)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 weight group size (0: per channel)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gemm_<device>.md/.json (default benchmarks/results; --quick: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted = args.backends or [b for b in qk.dispatch.AUTO_ORDER[device.type] if device.type == "cpu" or b != "reference"]
    backends = []
    for b in wanted:
        ok, reason = qk.available(b, device)
        (backends.append(b) if ok else log.info("backend %s skipped: %s", b, reason))
    if not backends:
        parser.error(f"none of the backends {wanted} can run on {device.type} here")
    primary = backends[0]

    shapes = zoo_shapes()
    ms = MS
    if args.quick:
        ms = QUICK_MS
        shapes = [s for s in shapes if s.k * s.n <= 1 << 18][:3] + [Shape("square", 1024, 1024)]
    else:
        shapes.append(Shape("square", *BIG))
    problems = [Problem(s, m, device, args.group_size) for s in shapes for m in ms]
    if not args.quick:
        problems.insert(len(problems) - len(ms) + 1, Problem(Shape("square", *BIG), 1, device, args.group_size, True))
    if device.type == "cuda" and not args.quick:
        problems = gpu_problems(device, args.group_size)
    cands = candidates(device, backends)
    llc = last_level_cache_bytes(device)
    per_round_s = 0.04 if args.quick else 0.25

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for p in tqdm(problems, desc="gemm", unit="shape", disable=None):
        cells = measure(p, cands, llc, per_round_s)
        rows.append({"layer": p.shape.label, "m": p.m, "k": p.shape.k, "n": p.shape.n, "cold": p.cold,
                     "cells": {name: {"median_ms": c.median_ms, "p90_ms": c.p90_ms, "runs": c.runs,
                                      "weight_copies": c.copies, "skipped": c.skipped} for name, c in cells.items()}})
        for p_attr in ("x", "w", "xb", "a8", "w8", "w4"):
            p.__dict__.pop(p_attr, None)  # free the inputs of this shape before the next

    names = [c.name for c in cands]
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    env = environment()
    env["versions"]["triton"] = _version("triton")
    cpu_feature = qk.available("cpu", "cpu")[1] if device.type == "cpu" else None
    command = ("python benchmarks/gemm.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    checks = gpu_acceptance(rows, backends) if device.type == "cuda" else acceptance(rows, primary)
    base_name = "bf16" if device.type == "cuda" else "fp32"
    machine = env["machine"]
    gpu = ""
    if device.type == "cuda":
        g = env["machine"].get("gpu") or {}
        gpu = (f"; GPU {torch.cuda.get_device_name(device)} (sm_{str(g.get('capability', '')).replace('.', '')}, "
               f"CUDA {torch.version.cuda}, driver {g.get('driver')})")
    cold_note = next((r["cells"]["fp32"]["weight_copies"] for r in rows if r["cold"]), None)
    header = (
        f"Machine: {machine_text(machine, f'{torch.get_num_threads()} torch threads')}{gpu}; "
        f"L3/L2 cache {llc >> 20} MiB; {platform.system()}.\n"
        f"Versions: torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
        f"python {env['versions']['python']}. Date: {env['date']}.\n"
        f"Command: `{command}`\n"
        + (f"Load average (1 min) at start / end: {load_start[0]:.2f} / {load_end[0]:.2f}.\n" if load_start else "")
        + (f"CPU backend: {cpu_feature}.\n" if cpu_feature else "")
        + f"Backends timed: {', '.join(backends)}; int4 group size {args.group_size or 'per channel'}.\n\n"
        f"Medians over 3 interleaved rounds; `(Nx)` is {base_name} time / column time (higher is faster). "
        "int8 columns time the GEMM alone (activations quantized beforehand); `torch int8` returns int32 "
        "without scaling. Cold row: each call reads the next of several weight copies "
        f"(fp32: {cold_note} copies; smaller weights more), together at least twice the {llc >> 20} MiB "
        "last-level cache, so weights come from DRAM every call. When other processes keep cores busy, an "
        "OpenMP thread team (torch's own ops) waits for its descheduled threads for a scheduler time slice: "
        "medians at multiples of 4-8 ms are such stalls, not kernel speed (qframe's CPU kernels claim work "
        "dynamically and do not wait for threads that have not started). Compare runs on an idle machine.\n"
    )
    text = f"# GEMM benchmark: {device_slug(device)}\n\n{header}\n{table(rows, names, base_name)}\n\n## Acceptance\n\n" \
           f"{acceptance_text(checks)}\n"
    print("\n" + text)
    skipped = {(n, c["skipped"]) for r in rows for n, c in r["cells"].items() if c["skipped"]}
    for name, why in sorted(skipped):
        log.info("n/a %s: %s", name, why)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        slug = device_slug(device)
        atomic_write_text(text, out / f"gemm_{slug}.md")
        atomic_write_json({"device": slug, "command": command, **env, "load_average_start_end": [load_start, load_end],
                           "llc_bytes": llc, "backends": backends,
                           "group_size": args.group_size, "cpu_backend": cpu_feature, "rows": rows,
                           "acceptance": checks}, out / f"gemm_{slug}.json")
        log.info("wrote %s and .json", out / f"gemm_{slug}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
