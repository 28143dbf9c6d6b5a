"""A real qat_orin run (tiny settings), shared by the deployment tests: checkpoints, ONNX, tensorrt/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_qframe(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def qat_orin_run(tmp_path_factory):
    """``+experiment=qat_orin`` on the compact CNN, 16x16 digits, one epoch each: about 15 s."""
    run_dir = tmp_path_factory.mktemp("qat_orin")
    proc = run_qframe("+experiment=qat_orin", "model=compact_cnn", "data.image_size=16", "train.epochs=1",
                      "train.min_steps=0", "method.epochs=1", "method.calib_batches=2", "measure.enabled=false",
                      "export.timing_runs=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
