"""Tests of the data sets: splits, determinism, normalisation, image folders, errors, augmentation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qframe.data import DATASETS, DataBundle, augment_batch, build_data
from qframe.errors import QFrameError

REPO = Path(__file__).resolve().parents[1]
ORL = REPO.parent / "shared" / "data" / "orl_faces"


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data("digits", image_size=16, seed=3)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_digits_split_sizes_and_stratification(digits):
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797 and min(sizes) > 200
    assert digits.num_classes == 10 and digits.channels == 1 and digits.image_size == 16
    assert digits.class_names == [str(i) for i in range(10)]
    for ds in (digits.train, digits.val, digits.test):
        x, y = ds.tensors
        assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
    # per class: round(n * 0.15) test and val, at least 1
    y_all = torch.cat([digits.train.tensors[1], digits.val.tensors[1], digits.test.tensors[1]])
    for c in range(10):
        n = int((y_all == c).sum())
        assert int((digits.test.tensors[1] == c).sum()) == max(1, round(n * 0.15))
        assert int((digits.val.tensors[1] == c).sum()) == max(1, round(n * 0.15))


def test_digits_normalised_with_train_statistics(digits):
    x = digits.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    assert len(digits.mean) == len(digits.std) == 1 and 0 < digits.mean[0] < 1 and digits.std[0] > 0
    # val/test use the train statistics, so they are only close to 0/1
    assert abs(digits.test.tensors[0].mean().item()) < 0.2


def test_digits_splits_are_deterministic(digits):
    again = build_data("digits", image_size=16, seed=3)
    other = build_data("digits", image_size=16, seed=4)
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(digits, split).tensors, getattr(again, split).tensors):
            assert torch.equal(a, b)
    assert not torch.equal(digits.test.tensors[0], other.test.tensors[0])


def test_digits_three_channels():
    b = build_data("digits", image_size=12, channels=3)
    x = b.train.tensors[0]
    assert x.shape[1:] == (3, 12, 12) and len(b.mean) == 3
    assert torch.allclose(x[:, 0], x[:, 2])


def test_loader_batches_and_seeded_shuffle(digits):
    def first_labels(seed):
        return next(iter(digits.loader("train", 32, shuffle=True, seed=seed)))[1]

    xb, yb = next(iter(digits.loader("val", 50)))
    assert xb.shape == (50, 1, 16, 16) and yb.shape == (50,)
    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))
    n = sum(len(y) for _, y in digits.loader("train", 100, drop_last=True))
    assert n == len(digits.train) // 100 * 100
    with pytest.raises(QFrameError) as e:
        digits.loader("holdout", 8)
    assert "holdout" in _one_line(e)


def _write_folder(root: Path, counts=(10, 7, 5)) -> Path:
    """Classes of random images of different sizes, stored as PGM, PNG, JPEG, TIFF, GIF and WebP."""
    rng = np.random.default_rng()
    formats = [("PPM", ".pgm", "L"), ("PNG", ".png", "RGB"), ("JPEG", ".jpg", "RGB"), ("TIFF", ".tif", "L"),
               ("GIF", ".gif", "L"), ("WEBP", ".webp", "RGB")]
    for c, n in enumerate(counts):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            fmt, ext, mode = formats[(c + i) % len(formats)]
            shape = (20 + i, 24) if mode == "L" else (20 + i, 24, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}{ext}", fmt)
    (root / "class_0" / "notes.txt").write_text("not an image")  # other files are ignored
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_loads_all_formats(tmp_path, channels):
    root = _write_folder(tmp_path / "imgs")
    b = build_data("imagefolder", root=str(root), image_size=16, channels=channels, seed=1)
    assert b.class_names == ["class_0", "class_1", "class_2"] and b.num_classes == 3
    assert len(b.train) + len(b.val) + len(b.test) == 22
    # class of 10 -> 2 test, 2 val, 6 train; of 7 -> 1/1/5; of 5 -> 1/1/3
    assert [int((b.test.tensors[1] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert [int((b.train.tensors[1] == c).sum()) for c in range(3)] == [6, 5, 3]
    assert b.train.tensors[0].shape[1:] == (channels, 16, 16)
    assert len(b.mean) == channels


def test_imagefolder_errors(tmp_path):
    def err(**kw) -> str:
        with pytest.raises(QFrameError) as e:
            build_data("imagefolder", image_size=16, **kw)
        return _one_line(e)

    assert "data.root must be set" in err(root=None)
    assert "does not exist" in err(root=str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    assert "file.txt' is a file, not a folder; valid: a folder with one sub-folder" in err(root=str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    assert "no class folders" in err(root=str(tmp_path / "empty"))
    one = _write_folder(tmp_path / "one", counts=(4,))
    assert "only one class" in err(root=str(one))
    noimg = _write_folder(tmp_path / "noimg", counts=(4, 4))
    (noimg / "zeta").mkdir()
    (noimg / "zeta" / "readme.txt").write_text("x")
    assert "zeta" in err(root=str(noimg))
    broken = _write_folder(tmp_path / "broken", counts=(4, 4))
    (broken / "class_1" / "bad.png").write_bytes(b"\x89PNG not really")
    assert "bad.png" in err(root=str(broken))
    few = _write_folder(tmp_path / "few", counts=(5, 2))
    assert "class_1" in err(root=str(few))


@pytest.mark.parametrize("kwargs, word", [
    (dict(val_fraction=0.0), "val_fraction"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(val_fraction=0.5, test_fraction=0.5), "< 1"), (dict(channels=2), "channels"),
    (dict(root="faces/"), "root='faces/' is for data set 'imagefolder'; 'digits' is built in"),
    (dict(extensions=(".png",)), "extensions=('.png',) is for data set 'imagefolder'"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(QFrameError) as e:
        build_data("digits", **kwargs)
    assert word in _one_line(e)


def test_unknown_data_set_lists_valid():
    with pytest.raises(QFrameError) as e:
        build_data("cifar11")
    msg = _one_line(e)
    assert "cifar11" in msg and all(name in msg for name in DATASETS)


def test_augment_batch():
    x = torch.randn(8, 3, 16, 16)
    assert augment_batch(x) is x
    g = torch.Generator().manual_seed(0)
    shifted = augment_batch(x, shift=0.25, generator=g)
    assert shifted.shape == x.shape and not torch.allclose(shifted, x)
    again = augment_batch(x, shift=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    flipped = augment_batch(x, hflip=True, generator=torch.Generator().manual_seed(1))
    # without shift each sample is either unchanged or exactly mirrored, and both occur
    same = [torch.allclose(flipped[i], x[i], atol=1e-5) for i in range(8)]
    mirror = [torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5) for i in range(8)]
    assert all(s or m for s, m in zip(same, mirror)) and any(same) and any(mirror)
    with pytest.raises(QFrameError):
        augment_batch(x, shift=1.5)


def test_import_is_lazy():
    code = "import sys, qframe.data; assert 'sklearn' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not present in shared/data/orl_faces")
def test_orl_faces():
    b = build_data("imagefolder", root=str(ORL), image_size=64)
    assert b.num_classes == 40
    assert len(b.train) + len(b.val) + len(b.test) == 400
    assert len(b.test) == 80 and len(b.val) == 80
    assert b.train.tensors[0].shape[1:] == (1, 64, 64)
