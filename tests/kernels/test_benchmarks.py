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
