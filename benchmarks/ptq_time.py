"""How long qframe.ptq, evaluating its fake-quant model and a QAT step take beside float ones, per model.

    python benchmarks/ptq_time.py                                  # this checkout
    python benchmarks/ptq_time.py --baseline ../qframe-old         # and another checkout, side by side

Each model (random init, BatchNorm statistics randomised, eval mode, one thread) is quantized with the w8a8
preset on ``--batches`` calibration batches of ``--batch`` images, ``--repeats`` times; the table gives the
median PTQ seconds, the seconds of one float forward pass, the PTQ time in float passes, and how often the model
ran on the first batch before calibration began (BN folding and its checks, quantizer placement), then the
seconds ``qframe.evaluate`` takes on the fake-quant model and on the float model over the same batches, and
the seconds of one training step (SGD, cross-entropy, median of ``--repeats`` x 3 steps after one) of the QAT
model (``prepare_qat``, w8a8) and of the float model. With
``--baseline`` the same measurement runs, interleaved, in a subprocess that imports qframe from that checkout,
and the last columns are its times over this checkout's. Writes benchmarks/results/ptq_time[_<tag>].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("resnet18", "mobilenet_v2", "hf_convnext", "hf_vit", "hf_mobilevit")


def build(name: str, size: int):
    import torch

    if not name.startswith("hf_"):
        from qframe.models import build_model

        return build_model(name, num_classes=10, in_channels=3)
    import transformers as T

    make = {"hf_convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(num_labels=10, image_size=size)),
            "hf_vit": lambda: T.ViTForImageClassification(T.ViTConfig(
                image_size=size, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                intermediate_size=768, num_labels=10)),
            "hf_mobilevit": lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
                image_size=size, num_labels=10))}[name]

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    return Logits(make())


def measure(name: str, args) -> dict:
    """One model in this process: PTQ seconds (each repeat), one float pass, first-batch passes before calibration."""
    import torch

    import qframe

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build(name, args.size).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    batches = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.batches)]
    first = batches[0]
    passes = {"before": 0, "calibrating": False}

    def count(module, inputs):  # deep copies keep the hook: it counts the copies' passes too
        if any(f.name == "calibrate" for f in traceback.extract_stack(limit=12)):
            passes["calibrating"] = True
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.data_ptr() == first.data_ptr() and not passes["calibrating"]:
            passes["before"] += 1

    handle = model.register_forward_pre_hook(count)
    qframe.ptq(model, qframe.preset("w8a8"), batches, args.batches)
    handle.remove()
    with torch.no_grad():
        model(first)
        start = time.perf_counter()
        model(first)
        forward = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), batches, args.batches)
        seconds.append(time.perf_counter() - start)
    labelled = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in batches]
    evaluate = {}
    for key, m in (("eval_s", qmodel), ("float_eval_s", model)):
        evaluate[key] = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            qframe.evaluate(m, labelled)
            evaluate[key].append(time.perf_counter() - start)
    from qframe.methods.qat import QATConfig, prepare_qat

    x, y = labelled[0][0], torch.randint(0, 10, (args.batch,))
    steps = {}
    for key, m in (("qat_step_s", prepare_qat(model, qframe.preset("w8a8"), batches, 1, QATConfig())),
                   ("float_step_s", build(name, args.size))):
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.0)  # the time of a step, not where it leads
        steps[key] = []
        for i in range(args.repeats * 3 + 1):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i:  # the first step allocates
                steps[key].append(time.perf_counter() - start)
    return {"ptq_s": seconds, "forward_s": forward, "first_batch_passes": passes["before"], **evaluate, **steps}


def in_subprocess(checkout: str, name: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--batch", str(args.batch),
           "--batches", str(args.batches), "--size", str(args.size), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="another qframe checkout to measure side by side")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a subprocess's model
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    import logging

    logging.disable(logging.WARNING)  # the models are random: their range warnings are not the point here
    rows = []
    for name in args.models:
        here = in_subprocess(str(ROOT), name, args)
        base = in_subprocess(args.baseline, name, args) if args.baseline else None
        rows.append({"model": name, "here": here, "baseline": base})
    from qframe.utils.env import environment, results_header
    from qframe.utils.io import atomic_write_json, atomic_write_text

    env = environment()
    command = ("python benchmarks/ptq_time.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    head = ("| model | PTQ s | float pass s | PTQ in float passes | first-batch passes before calibration | "
            "evaluate fake-quant s | evaluate float s | QAT step s | float step s |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if args.baseline:
        head += (" baseline PTQ s | baseline passes | baseline evaluate s | baseline QAT step s | PTQ: baseline / this |"
                 " evaluate: baseline / this | QAT step: baseline / this |")
        sep += "---|---|---|---|---|---|---|"
    lines = [head, sep]
    for row in rows:
        h = row["here"]
        ptq = statistics.median(h["ptq_s"])
        ev, st = statistics.median(h["eval_s"]), statistics.median(h["qat_step_s"])
        line = (f"| {row['model']} | {ptq:.2f} | {h['forward_s']:.3f} | {ptq / h['forward_s']:.1f} | "
                f"{h['first_batch_passes']} | {ev:.2f} | {statistics.median(h['float_eval_s']):.2f} | {st:.3f} | "
                f"{statistics.median(h['float_step_s']):.3f} |")
        if row["baseline"]:
            b = row["baseline"]
            bp, bev, bst = (statistics.median(b[k]) for k in ("ptq_s", "eval_s", "qat_step_s"))
            line += (f" {bp:.2f} | {b['first_batch_passes']} | {bev:.2f} | {bst:.3f} | {bp / ptq:.2f} | {bev / ev:.2f} |"
                     f" {bst / st:.2f} |")
        lines.append(line)
    text = results_header("PTQ, fake-quant evaluation and QAT step time beside float", env, command) + (
        f"w8a8 on {args.batches} calibration batches of {args.batch} images {args.size}x{args.size}, one thread, "
        f"median of {args.repeats}; random-init models, BatchNorm statistics randomised.\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    if not args.no_write:
        suffix = f"_{args.tag}" if args.tag else ""
        atomic_write_text(text, RESULTS / f"ptq_time{suffix}.md")
        atomic_write_json({"command": command, **env, "rows": rows}, RESULTS / f"ptq_time{suffix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
