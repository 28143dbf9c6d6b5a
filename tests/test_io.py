"""Atomic writes: the file appears whole or not at all, with the mode a plain open() would give."""

import os
from pathlib import Path

import pytest
import torch

from qframe.errors import QFrameError
from qframe.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint


def test_atomic_write_gives_the_mode_open_would_and_leaves_no_temporary(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = atomic_write_text("hello", tmp_path / "atomic.txt")
    assert out.read_text() == "hello"
    assert os.stat(out).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "plain.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = atomic_torch_save({"a": torch.ones(2)}, tmp_path / "r.pt")
    with pytest.raises(Exception):
        atomic_torch_save({"a": lambda: 0}, path)  # pickling fails half-way through the write
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]


def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    good = atomic_torch_save({"w": torch.randn(3)}, tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(QFrameError, match="bad.pt"):
        load_checkpoint(bad)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_onnx_copy_npz_and_script_writers_round_trip(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from qframe.utils.io import atomic_copy, atomic_onnx_save, atomic_write_bytes, atomic_write_npz

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_model(helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    path = atomic_onnx_save(graph, tmp_path / "m.onnx")
    assert onnx.load(str(path)) == graph
    copy = atomic_copy(path, tmp_path / "copy.onnx")
    assert copy.read_bytes() == path.read_bytes()
    payload = os.urandom(3000)
    assert atomic_write_bytes(payload, tmp_path / "engine.plan").read_bytes() == payload
    x = np.random.default_rng().normal(size=(3, 4)).astype(np.float32)
    with np.load(atomic_write_npz({"x": x}, tmp_path / "t.npz")) as z:
        np.testing.assert_array_equal(z["x"], x)
    script = atomic_write_text("#!/bin/sh\necho hi\n", tmp_path / "run.sh", executable=True)
    assert os.access(script, os.X_OK) and not os.access(tmp_path / "t.npz", os.X_OK)
    assert _leftovers(tmp_path) == []


def test_failed_onnx_save_copy_and_figure_keep_the_old_file(tmp_path):
    from qframe.utils.io import atomic_copy, atomic_onnx_save, atomic_savefig

    class Unserialisable:
        def SerializeToString(self):
            raise MemoryError("killed while serialising")

    old = atomic_write_text("old", tmp_path / "m.onnx")
    with pytest.raises(MemoryError):
        atomic_onnx_save(Unserialisable(), old)
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.onnx", old)
    assert old.read_text() == "old" and _leftovers(tmp_path) == []

    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = atomic_savefig(fig, tmp_path / "plot.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(Exception):
        atomic_savefig(fig, png, dpi=50, bbox_inches="no such option")
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _leftovers(tmp_path) == []


def test_a_file_in_the_way_of_the_folder_is_one_line(tmp_path):
    from qframe.utils.io import atomic_write_bytes

    (tmp_path / "results").write_text("a file, not a folder")
    with pytest.raises(QFrameError) as err:
        atomic_write_bytes(b"x", tmp_path / "results" / "run" / "model.onnx")
    assert str(err.value) == (f"cannot write '{tmp_path}/results/run/model.onnx': '{tmp_path}/results' is a file, "
                              "not a folder; give a path in a folder")
    assert (tmp_path / "results").read_text() == "a file, not a folder"



def test_what_a_killed_writer_leaves_is_removed_and_nothing_else(tmp_path):
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from qframe.utils.io import remove_stale_temporaries

    run = tmp_path / "run"
    (run / "onnx").mkdir(parents=True)
    writer = ("import sys, time\nimport qframe.utils.io as io\n"
              "io._atomic_write(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), time.sleep(60)))\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(run / "fp32.pt")])
    deadline = time.time() + 60
    while not list(run.glob(".fp32.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the temporary file stays
    proc.wait()
    killed = list(run.glob(".fp32.pt.*.tmp"))
    assert len(killed) == 1 and not (run / "fp32.pt").exists()
    scratch = Path(tempfile.mkdtemp(prefix=".model_int8.onnx.", dir=run / "onnx"))  # export_onnx's scratch folder
    (scratch / "model_int8.onnx").write_bytes(b"partial")
    top = Path(tempfile.mkdtemp(prefix=".model_fp32.onnx.", dir=run))  # one in the run directory itself
    (top / "model_fp32.onnx").write_bytes(b"partial")
    (run / "onnx" / "deeper").mkdir()
    mine = [run / "notes.tmp", run / ".cache.tmp", run / "onnx" / "model_int8.onnx", run / "onnx" / ".onnx.keep",
            run / "onnx" / "deeper" / ".data.abcd1234.tmp"]  # below the run's own folders: not searched
    for p in mine:
        p.write_text("not a temporary of qframe's")

    removed = remove_stale_temporaries(run)
    assert sorted(removed) == sorted([killed[0], scratch, top])
    assert sorted(p for p in run.rglob("*") if p.is_file()) == sorted(mine)
