"""Atomic writes: the file appears whole or not at all, with the mode a plain open() would give."""

import os

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
