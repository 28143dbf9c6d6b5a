"""One rank of the two-process DDP test (tests/test_distributed.py launches it with torchrun).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR``

Every rank trains the same tiny model with ``qframe.train.fit`` three times on the digits:

* run A: 2 epochs, backbone frozen in the first (DDP must be re-built when it thaws), checkpointed;
* run B: the same, killed in the middle of epoch 2 on every rank at the same step;
* run C: a fresh model resumed from B's checkpoint; it must end bit-identical to A.

It then writes ``OUT_DIR/rank{R}.pt`` with what the test checks (final parameters, the shard it
saw, how many checkpoints it wrote, ...). It prints, as a script should.
"""

from __future__ import annotations

import logging
import os
import sys
import zlib
from pathlib import Path

import torch

# run from anywhere: the repository root on the path, as pytest has it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qframe.train as train_module  # noqa: E402
from qframe import distributed as dist  # noqa: E402
from qframe.data import augment_batch, build_data  # noqa: E402
from qframe.models import build_model  # noqa: E402
from qframe.train import TrainConfig, evaluate, fit  # noqa: E402


class Kill(Exception):
    pass


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def fresh_model(data, seed: int = 7):
    torch.manual_seed(seed)  # the same on every rank: dropout masks and RNG state stay in step
    return build_model("compact_cnn", data.num_classes, data.channels, data.image_size)


def main(out: Path) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    torch.set_num_threads(1)
    data = build_data("digits", image_size=16, channels=1, seed=3)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, freeze_backbone_epochs=1)

    saves = []  # count this rank's checkpoint writes: only rank 0 may write
    real_save = train_module.atomic_torch_save

    def counting_save(obj, path):
        saves.append(str(path))
        return real_save(obj, path)

    train_module.atomic_torch_save = counting_save

    # run A ----------------------------------------------------------------------------------
    model = fresh_model(data)
    init = flat(model.parameters())
    with torch.random.fork_rng():  # iterating a DataLoader draws from the global RNG; run B does not do this
        before = evaluate(model, data.loader("val", 256))["accuracy"]
    fingerprints: list[int] = []  # crc32 of every training image this rank saw in epoch 1
    frozen_epoch_changed: list[str] = []  # parameters that moved during the frozen first epoch
    initial_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {"epoch": 0}

    def recording_augment(x, g):
        if state["epoch"] == 0:
            fingerprints.extend(zlib.crc32(img.numpy().tobytes()) for img in x)
        return augment_batch(x, shift=0.1, generator=g)

    def on_epoch_start(epoch, m):
        state["epoch"] = epoch
        if epoch == 1:
            frozen_epoch_changed.extend(n for n, p in m.named_parameters() if not torch.equal(p, initial_state[n]))

    ckpt = out / "a.pt"
    history = fit(model, data, cfg, seed=1, augment=recording_augment, checkpoint_path=ckpt,
                  on_epoch_start=on_epoch_start)
    after = evaluate(model, data.loader("val", 256))["accuracy"]
    saves_a = len(saves)
    dist.barrier()  # rank 0's last checkpoint is in place before anyone reads it
    ckpt_keys = list(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])

    # run B (killed) and run C (resumed) --------------------------------------------------------
    steps = len(data.train) // dist.world_size() // cfg.batch_size  # per-rank steps of one epoch
    calls = {"n": 0}

    def dying_augment(x, g):
        calls["n"] += 1
        if calls["n"] == steps + 2:  # the middle of the second epoch, on every rank at the same step
            raise Kill
        return augment_batch(x, shift=0.1, generator=g)

    ckpt_b = out / "b.pt"
    try:
        fit(fresh_model(data), data, cfg, seed=1, augment=dying_augment, checkpoint_path=ckpt_b)
        raise SystemExit("run B was not killed")
    except Kill:
        pass
    dist.barrier()
    resumed = fresh_model(data, seed=12345)  # other weights and RNG state: the checkpoint must restore both
    resumed_cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, freeze_backbone_epochs=1, resume=str(ckpt_b))
    resumed_history = fit(resumed, data, resumed_cfg, seed=1, augment=lambda x, g: augment_batch(x, shift=0.1, generator=g),
                          checkpoint_path=ckpt_b)
    resume_equal = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))

    # quantization-aware training through the same loop: calibrate, then train with learned step sizes
    from qframe.methods.qat import QATConfig, prepare_qat, qat
    from qframe.quant.recipe import preset

    qat_cfg = QATConfig(epochs=1, lsq=True, freeze_bn_epoch=1)
    start = prepare_qat(model, preset("w4a8"), data.loader("train", 64, shuffle=True, seed=0), 2, qat_cfg)
    qmodel = qat(model, preset("w4a8"), data, qat_cfg, TrainConfig(batch_size=64),
                 calib_batches=data.loader("train", 64, shuffle=True, seed=0), num_batches=2, seed=2)
    qat_report = {"params": flat(qmodel.parameters()), "buffers": flat(b.float() for b in qmodel.buffers()),
                  "scales": flat(q.scale.detach() for q in qmodel.modules() if hasattr(q, "observer")),
                  "start_params": flat(start.parameters()),
                  "accuracy": evaluate(qmodel, data.loader("val", 256))["accuracy"]}

    torch.save({
        "qat": qat_report,
        "rank": dist.rank(), "world_size": dist.world_size(), "steps": steps,
        "init": init, "params": flat(model.parameters()), "buffers": flat(model.buffers()),
        "accuracy_before": before, "accuracy_after": after, "history": history,
        "fingerprints": fingerprints, "frozen_epoch_changed": frozen_epoch_changed,
        "saves_a": saves_a, "saves": saves, "checkpoint_keys": ckpt_keys,
        "resume_equal": resume_equal, "resumed_history": resumed_history,
    }, out / f"rank{dist.rank()}.pt")
    print(f"rank {dist.rank()}: accuracy {before:.1f}% -> {after:.1f}%, resume equal: {resume_equal}")
    dist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
