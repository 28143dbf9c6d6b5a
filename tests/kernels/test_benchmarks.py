"""benchmarks/gemm.py runs end to end (its --quick smoke mode) and takes its shapes from the zoo."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_gemm_shapes_come_from_zoo_layers():
    gemm = _load("gemm")
    shapes = gemm.zoo_shapes()
    labels = " ".join(s.label for s in shapes)
    assert all(m in labels for m in ("compact_cnn", "mobilenet_v2", "resnet18"))
    assert (4608, 512) in {(s.k, s.n) for s in shapes}  # resnet18's last 3x3 conv as im2col
    assert gemm.copies_for_cold(8 << 20, 32 << 20) * (8 << 20) >= 2 * (32 << 20) + (8 << 20)


def test_gemm_quick_prints_a_table_and_writes_nothing(capsys, monkeypatch, tmp_path):
    import torch

    gemm = _load("gemm")
    monkeypatch.setattr(gemm, "RESULTS", tmp_path)
    threads = torch.get_num_threads()
    try:
        assert gemm.main(["--quick", "--threads", "1", "--backends", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| layer | M | K | N | fp32 ms |" in out and "int8_mm [cpu]" in out and "## Acceptance" in out
    assert not list(tmp_path.iterdir())


def test_gemm_gpu_sweep_and_its_checks():
    import torch

    gemm = _load("gemm")
    problems = gemm.gpu_problems(torch.device("cpu"), 128)
    keys = {(p.m, p.shape.k, p.shape.n, p.cold) for p in problems}
    assert {(4096, 4096, 4096, False), (1, 4096, 4096, True), (1, 8192, 8192, True)} <= keys
    assert sum(1 for p in problems if p.m == 2048) == 3  # one heaviest GEMM per zoo model

    def row(m, k, cold, times):
        return {"layer": "square", "m": m, "k": k, "n": k, "cold": cold,
                "cells": {name: {"median_ms": t} for name, t in times.items()}}

    rows = [row(4096, 4096, False, {"bf16": 1.0, "int8_mm [triton]": 0.5, "int8_mm [cuda]": 2.0}),
            row(1, 8192, True, {"bf16": 0.040, "w4a16_mm [cuda]": 0.010, "w4a16_mm [triton]": 0.020})]
    checks = {c["check"]: c for c in gemm.gpu_acceptance(rows, ["triton", "cuda"])}
    assert checks["W8A8 int8_mm [triton] vs cuBLAS bf16, 4096^3"]["result"] == "PASS"  # 2x >= 1.6x
    assert checks["W8A8 int8_mm [cuda] vs cuBLAS bf16, 4096^3"]["result"] == "n/a"  # informational
    assert checks["w4a16_mm [cuda] vs cuBLAS bf16, M=1 cold, 8192x8192"]["result"] == "PASS"  # 4x
    assert checks["w4a16_mm [triton] vs cuBLAS bf16, M=1 cold, 8192x8192"]["result"] == "FAIL"  # 2x < 3x
    assert checks["w4a16_mm [cuda] vs cuBLAS bf16, M=1 cold, 4096x4096"]["value"] is None  # row not measured
