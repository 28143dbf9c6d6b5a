"""DDP under torchrun (two CPU processes, gloo), the single-process fallbacks, channels_last and bf16."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qframe import distributed as dist
from qframe.errors import QFrameError
from qframe.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
# what torchrun sets; a test process that inherited them would not be a clean launcher
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run tests/ddp_worker.py on two ranks once; return each rank's report."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    reports = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, reports


def test_ranks_stay_in_sync_and_learn(ddp_run):
    _, (r0, r1) = ddp_run
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    torch.testing.assert_close(r0["init"], r1["init"], rtol=0, atol=0)
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)  # DDP kept them identical
    torch.testing.assert_close(r0["buffers"], r1["buffers"], rtol=0, atol=0)  # BN statistics too
    assert not torch.equal(r0["params"], r0["init"])
    assert r0["history"] == r1["history"]  # metrics reduced over ranks, so the same everywhere
    assert r0["accuracy_after"] == r1["accuracy_after"] > max(50.0, r0["accuracy_before"] + 30)
    assert r0["history"][-1]["val_accuracy"] == pytest.approx(r0["accuracy_after"])


def test_qat_ranks_stay_in_sync(ddp_run):
    """Two QAT processes under torchrun end with the same weights, BN statistics and learned scales."""
    _, (r0, r1) = ddp_run
    q0, q1 = r0["qat"], r1["qat"]
    for key in ("params", "buffers", "scales"):
        torch.testing.assert_close(q0[key], q1[key], rtol=0, atol=0, msg=key)
    assert q0["scales"].numel() > 0 and torch.all(q0["scales"] > 0)
    assert q0["accuracy"] == q1["accuracy"] > 50.0
    # QAT moved weights and learned step sizes away from the calibrated start (same layout)
    assert q0["start_params"].shape == q0["params"].shape and not torch.equal(q0["start_params"], q0["params"])


def test_each_rank_trains_on_its_own_shard(ddp_run):
    _, (r0, r1) = ddp_run
    per_rank = r0["steps"] * 64  # train.batch_size is the batch of one process
    assert len(r0["fingerprints"]) == len(r1["fingerprints"]) == per_rank
    assert 2 * per_rank <= 1259 < 2 * (per_rank + 64)  # the two shards together cover one epoch
    assert r0["fingerprints"][:64] != r1["fingerprints"][:64]
    assert not set(r0["fingerprints"]) & set(r1["fingerprints"])  # disjoint shards


def test_only_rank0_writes_unprefixed_checkpoints(ddp_run):
    out, (r0, r1) = ddp_run
    # run A: 2 epochs; run B: killed in epoch 2 after 1 checkpoint; run C: resumed, 1 more
    assert r0["saves_a"] == 2 and len(r0["saves"]) == 4
    assert r1["saves"] == []
    assert r0["checkpoint_keys"] and not any(k.startswith("module.") for k in r0["checkpoint_keys"])
    assert (out / "a.pt").is_file() and not list(out.glob(".*tmp"))


def test_frozen_backbone_rewraps_and_resume_is_exact(ddp_run):
    _, (r0, r1) = ddp_run
    for r in (r0, r1):
        # first epoch: only the head moved; the second trained everything (DDP rebuilt when it thawed)
        assert sorted(r["frozen_epoch_changed"]) == ["classifier.1.bias", "classifier.1.weight"]
        n_backbone = r["init"].numel() - 1290  # Linear(128, 10) is the last 1290 parameters
        assert not torch.equal(r["params"][:n_backbone], r["init"][:n_backbone])
        assert r["resume_equal"]  # the killed-and-resumed run ends bit-identical to the unbroken one
        assert [h["epoch"] for h in r["resumed_history"]] == [1, 2]


def test_single_process_fallbacks(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")  # without WORLD_SIZE > 1 this is still the one (main) process
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.init_if_needed("cpu") is False
    dist.barrier()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_mean(t) is t and dist.all_reduce_sum(t) is t
    assert dist.local_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(QFrameError, match="WORLD_SIZE") as err:
        dist.world_size()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["channels_last", "bf16"])
def test_new_options_are_validated(field):
    with pytest.raises(QFrameError, match=f"train.{field}=") as err:
        TrainConfig(**{field: "yes"})
    assert "\n" not in str(err.value)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: these checks are about numerics, and on a small, busy
    CPU box OpenMP threads of tiny convolutions mostly wait for each other (bf16 conv backward ran
    ~50x slower with 2 threads than with 1 on the 2-core machine these tests were written on)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _short_fit(model, data, cfg):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtypes = []
    handle = model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype) if m.training else None)
    history = fit(model, data, cfg, seed=0)
    handle.remove()
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in history)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every parameter trained
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    return model, dtypes


def test_channels_last_trains(digits, one_thread, small_model):
    # batch 256 over 1259 images: 4 steps
    model, dtypes = _short_fit(small_model(digits), digits, TrainConfig(epochs=1, batch_size=256, channels_last=True))
    conv = model.features[1][0].weight  # not the first conv: with 1 input channel both layouts coincide
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert dtypes and set(dtypes) == {torch.float32}


def test_bf16_autocast_trains(digits, one_thread, small_model):
    _, dtypes = _short_fit(small_model(digits), digits, TrainConfig(epochs=1, batch_size=256, bf16=True))
    assert len(dtypes) == 4 and set(dtypes) == {torch.bfloat16}  # the training forwards ran in bf16


def test_bf16_with_channels_last_trains(digits, one_thread, small_model):
    _short_fit(small_model(digits), digits, TrainConfig(epochs=1, batch_size=256, bf16=True, channels_last=True))
